"""samseg.client: what an app server does with samseg — send, verify, parse, decode.

Signatures are made by samseg's own sender code (samseg.transfer.callbacks) and checked by the SDK through
`standardwebhooks`; HTTP goes through a real httpx client on a mock transport; SQS through a real botocore
client with its Stubber (sending to a live SQS or moto is left to the integration tier).
"""

from __future__ import annotations

import base64
import json
import time

import boto3
import httpx
import numpy as np
import pytest
from botocore.stub import Stubber
from pycocotools import mask as mask_utils
from pydantic import ValidationError
from standardwebhooks import Webhook

from samseg.client import (
    CallbackVerificationError,
    HttpJobs,
    SqsJobs,
    build_job,
    cancel_body,
    job_body,
    mask_from_png,
    mask_from_polygons,
    mask_from_rle,
    parse_result,
    segment_mask,
    verify_callback,
)
from samseg.core.contracts import BBox, CallbackBody, Point, ResultDocument, ResultSegment, Segment
from samseg.core.masks import encode_png
from samseg.core.outputs import encode_segment
from samseg.transfer.callbacks import signature_headers, webhook_id_for

SECRET = "whsec_" + base64.b64encode(bytes(range(32))).decode()


def a_callback() -> CallbackBody:
    segment = Segment(
        segment_id=0,
        mask_url="/assets/job-1/mask_images/mask_000.png",
        bbox=BBox(x=1, y=2, width=3, height=4),
        area=7,
        stability_score=0.97,
        predicted_iou=0.91,
        center_point=Point(x=2, y=4),
    )
    return CallbackBody(
        uuid="job-1",
        status="completed",
        segments=[segment],
        image_width=10,
        image_height=8,
        result_url="/assets/job-1/result.json",
    )


def signed(body: CallbackBody, now: float | None = None) -> tuple[bytes, dict[str, str]]:
    payload = body.model_dump_json(exclude_none=True)  # exactly what send_callback sends
    headers = signature_headers(Webhook(SECRET), webhook_id_for(body.uuid, "abc123"), payload, now or time.time())
    return payload.encode(), headers


def test_verify_a_real_signature() -> None:
    body = a_callback()
    raw, headers = signed(body)
    parsed = verify_callback(raw, {k.title(): v for k, v in headers.items()}, SECRET)  # header case is free
    assert parsed == body
    assert parsed.segments[0].bbox.height == 4 and parsed.result_url == "/assets/job-1/result.json"


def test_verification_rejects_tampering_wrong_secret_and_old_timestamps() -> None:
    raw, headers = signed(a_callback())
    with pytest.raises(CallbackVerificationError):
        verify_callback(raw.replace(b"0.97", b"0.99"), headers, SECRET)
    other = "whsec_" + base64.b64encode(bytes(range(1, 33))).decode()
    with pytest.raises(CallbackVerificationError):
        verify_callback(raw, headers, other)
    old_raw, old_headers = signed(a_callback(), now=time.time() - 3600)
    with pytest.raises(CallbackVerificationError):
        verify_callback(old_raw, old_headers, SECRET)
    with pytest.raises(CallbackVerificationError):
        verify_callback(raw, {}, SECRET)


def test_a_signed_body_that_is_not_a_callback_is_rejected() -> None:
    payload = json.dumps({"uuid": "x", "status": "exploded"})
    headers = signature_headers(Webhook(SECRET), "x.abc123", payload, time.time())
    with pytest.raises(CallbackVerificationError, match="not a samseg callback"):
        verify_callback(payload, headers, SECRET)


def test_decode_round_trips() -> None:
    rng = np.random.default_rng(11)
    mask = np.zeros((40, 50), bool)
    mask[5:30, 8:44] = rng.random((25, 36)) < 0.85
    packed = np.packbits(mask, axis=1)
    encoded = encode_segment(packed, 50, rle=True, polygons=True)
    assert encoded.rle is not None and encoded.polygons is not None
    rle = encoded.rle.model_dump()
    assert np.array_equal(mask_from_rle(rle), mask)
    assert np.array_equal(mask_utils.decode({**rle, "counts": rle["counts"].encode()}).astype(bool), mask)
    assert np.array_equal(mask_from_polygons(encoded.polygons, 40, 50), mask)
    assert np.array_equal(mask_from_png(encode_png(mask)), mask)
    segment = ResultSegment(**a_callback().segments[0].model_dump(), rle=encoded.rle, polygons=encoded.polygons)
    document = ResultDocument(uuid="job-1", status="completed", segments=[segment], image_width=50, image_height=40)
    parsed = parse_result(document.model_dump_json(exclude_none=True))
    first = parsed.segments[0]
    assert np.array_equal(segment_mask(first, 40, 50), mask)  # type: ignore[arg-type]
    assert np.array_equal(segment_mask(first.model_copy(update={"rle": None}), 40, 50), mask)  # type: ignore[arg-type]
    assert segment_mask(first.model_copy(update={"rle": None, "polygons": None}), 40, 50) is None


def test_build_job_and_its_wire_form() -> None:
    plain = build_job("job-1", "https://example.com/a.jpg")
    assert json.loads(job_body(plain)) == {"uuid": "job-1", "image_url": "https://example.com/a.jpg"}
    full = build_job(
        "job-2",
        "https://example.com/b.jpg",
        options={"max_masks": 20, "sort_by": "predicted_iou"},
        outputs=["coco_rle", "overlay"],
        ttl_seconds=600,
        events=["running"],
    )
    assert json.loads(job_body(full)) == {
        "uuid": "job-2",
        "image_url": "https://example.com/b.jpg",
        "options": {"max_masks": 20, "sort_by": "predicted_iou"},
        "outputs": ["coco_rle", "overlay"],
        "ttl_seconds": 600,
        "events": ["running"],
    }
    assert json.loads(cancel_body("job-2")) == {"uuid": "job-2", "action": "cancel"}
    with pytest.raises(ValidationError) as caught:
        build_job("job-3", "https://example.com/c.jpg", options={"max_masks": 0})
    assert caught.value.errors()[0]["loc"] == ("options", "max_masks")


def test_http_jobs() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        if request.method == "POST":
            body = json.loads(request.content)
            return httpx.Response(202, json={"uuid": body["uuid"], "status": "queued", "status_url": "/jobs/job-1"})
        if request.method == "DELETE":
            return httpx.Response(202, json={"uuid": "job-1", "status": "canceled", "updated_at": 1.0})
        if request.url.path == "/jobs/job-1":
            return httpx.Response(200, json={"uuid": "job-1", "status": "canceled", "updated_at": 1.0})
        return httpx.Response(200, content=ResultDocument(uuid="job-1", status="completed").model_dump_json())

    jobs = HttpJobs("http://samseg:8000/", "t" * 20, client=httpx.Client(transport=httpx.MockTransport(handler)))
    accepted = jobs.submit(build_job("job-1", "https://example.com/a.jpg", outputs=["label_map"]))
    assert accepted.status_url == "/jobs/job-1"
    assert jobs.cancel("job-1").status == "canceled"
    assert jobs.status("job-1").status == "canceled"
    assert jobs.result("/assets/job-1/result.json").uuid == "job-1"
    post, delete = seen[0], seen[1]
    assert (post.method, str(post.url)) == ("POST", "http://samseg:8000/jobs")
    assert post.headers["authorization"] == "Bearer " + "t" * 20
    assert json.loads(post.content) == {
        "uuid": "job-1",
        "image_url": "https://example.com/a.jpg",
        "outputs": ["label_map"],
    }
    assert (delete.method, str(delete.url)) == ("DELETE", "http://samseg:8000/jobs/job-1")


def test_sqs_jobs_send_the_message_bodies() -> None:
    client = boto3.client("sqs", region_name="us-east-1", aws_access_key_id="x", aws_secret_access_key="x")
    url = "https://sqs.us-east-1.amazonaws.com/123456789012/samseg-jobs"
    job = build_job("job-1", "https://example.com/a.jpg", options={"points_per_side": 16})
    with Stubber(client) as stub:
        stub.add_response(
            "send_message",
            {"MessageId": "m-1", "MD5OfMessageBody": "x"},
            {"QueueUrl": url, "MessageBody": job_body(job)},
        )
        stub.add_response(
            "send_message",
            {"MessageId": "m-2", "MD5OfMessageBody": "x"},
            {"QueueUrl": url, "MessageBody": cancel_body("job-1")},
        )
        jobs = SqsJobs(url, sqs=client)
        assert jobs.send(job) == "m-1"
        assert jobs.cancel("job-1") == "m-2"
        stub.assert_no_pending_responses()
