"""Issue 16 on the real stack, driven through the app-server SDK (samseg.client) as an app server would.

Real: moto's SQS server (AWS stand-in), `celery -A samseg worker` with the SAM-2 model code (random weights:
Meta's cannot be downloaded here, so the conftest switches the mask filters off), uvicorn serving samseg.api,
loopback servers for the image host and the app server, Standard-Webhooks signatures checked with the
`standardwebhooks` library (through `samseg.client.verify_callback`), and the libraries a client would decode
with: pycocotools for RLE, shapely for polygons, Pillow for the label map and overlay.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import re
import secrets
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import shapely
from PIL import Image
from pycocotools import mask as coco_mask

from samseg.client import HttpJobs, SqsJobs, build_job, parse_result, verify_callback
from samseg.client.decode import mask_from_png
from samseg.core.contracts import CallbackBody
from samseg.core.outputs import overlay_size, paint_order
from tests.support import API_TOKEN, LoopbackServer, Recorded, Route, scene_png

CALLBACK_PREFIX = "/api/v1/re-imagine/auto-mask/"
WEBHOOK_SECRET = "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()
ASSET_SECRET = secrets.token_urlsafe(32)


def patches(uuid: str) -> Any:
    return lambda r: r.method == "PATCH" and r.path == CALLBACK_PREFIX + uuid


def verified(request: Recorded) -> CallbackBody:
    """What the app server does with each PATCH: verify the signature over the raw body, then parse it."""
    return verify_callback(request.body, request.headers, WEBHOOK_SECRET)


def terminal(app_server: LoopbackServer, uuid: str, timeout: float = 240, count: int = 1) -> list[Recorded]:
    def is_terminal(r: Recorded) -> bool:
        return patches(uuid)(r) and json.loads(r.body)["status"] != "running"

    return app_server.wait_for(is_terminal, timeout=timeout, count=count)


def segmented_lines(worker_output: str, uuid: str) -> list[dict[str, Any]]:
    """The worker's `image_segmented` log lines for this job: one per model run."""
    lines = [json.loads(line) for line in worker_output.splitlines() if line.startswith("{")]
    return [line for line in lines if line.get("event") == "image_segmented" and line.get("job_uuid") == uuid]


@pytest.fixture
def stack(make_stack: Any, http_server: LoopbackServer, app_server: LoopbackServer) -> Any:
    http_server.routes["/img/scene.png"] = Route(body=scene_png(160, 120), headers={"Content-Type": "image/png"})
    http_server.routes["/img/wide.png"] = Route(body=scene_png(2560, 320, 3), headers={"Content-Type": "image/png"})
    return make_stack(
        SAMSEG_APP_SERVER_URL=app_server.url,
        SAMSEG_WEBHOOK_SECRET=WEBHOOK_SECRET,
        SAMSEG_ASSET_URL_SECRET=ASSET_SECRET,
    )


def sqs_jobs(stack: Any) -> SqsJobs:
    client = stack.sqs()
    return SqsJobs(client.get_queue_url(QueueName=stack.jobs_queue)["QueueUrl"], sqs=client)


def test_options_outputs_and_the_running_event_reach_the_app_server(
    stack: Any, http_server: LoopbackServer, app_server: LoopbackServer, tiny_checkpoint: Path
) -> None:
    api = stack.start_api()
    worker = stack.start_worker()
    jobs, http = sqs_jobs(stack), HttpJobs(api, API_TOKEN)
    rich = build_job(
        "opt-rich",
        f"{http_server.url}/img/scene.png",
        options={"points_per_side": 8, "max_masks": 5, "sort_by": "predicted_iou", "polygon_tolerance": 0},
        outputs=["coco_rle", "polygons", "label_map", "overlay"],
        events=["running"],
    )
    plain = build_job("opt-plain", f"{http_server.url}/img/scene.png")
    wide = build_job("opt-wide", f"{http_server.url}/img/wide.png", outputs=["overlay"])
    for job in (rich, plain, wide):
        jobs.send(job)

    # The rich job: a signed `running` event first (its own webhook-id), then the terminal callback.
    (done,) = terminal(app_server, "opt-rich")
    calls = [r for r in app_server.requests if patches("opt-rich")(r)]
    bodies = [verified(r) for r in calls]
    assert [b.status for b in bodies] == ["running", "completed"], bodies
    run_ids = {r.headers["webhook-id"].split(".")[1] for r in calls}
    assert len(run_ids) == 1 and calls[0].headers["webhook-id"] == f"opt-rich.{run_ids.pop()}.running"
    assert calls[0].headers["webhook-id"] != done.headers["webhook-id"]
    body = bodies[-1]
    assert 0 < len(body.segments) <= 5  # max_masks
    ious = [s.predicted_iou for s in body.segments]
    assert ious == sorted(ious, reverse=True)  # sort_by predicted_iou; segment_id is the index in that order
    assert [s.segment_id for s in body.segments] == list(range(len(body.segments)))
    assert body.result_url and body.label_map_url and body.overlay_url
    assert "signature=" in body.label_map_url and "signature=" in body.result_url  # signed like the masks

    # result.json, fetched by its signed URL (no token), records what produced it.
    document = parse_result(httpx.get(body.result_url, timeout=10).content)
    assert document.params is not None and document.params.points_per_side == 8
    assert document.params.max_masks == 5 and document.params.sort_by == "predicted_iou"
    assert document.outputs == ["coco_rle", "polygons", "label_map", "overlay"]
    assert document.model is not None and document.model.config == "sam2.1_hiera_tiny"
    assert document.model.checkpoint_sha256 == hashlib.sha256(tiny_checkpoint.read_bytes()).hexdigest()
    assert document.samseg_version and re.fullmatch(r"\d+\.\d+.*", document.samseg_version)
    assert document.callback_body() == body  # the PATCH is result.json without the per-mask encodings

    # Every encoding decodes, with the client's own libraries, to exactly the mask PNG.
    height, width = 120, 160
    masks = []
    for segment in document.segments:
        mask = mask_from_png(http.download(segment.mask_url))
        masks.append(mask)
        assert segment.rle is not None and segment.polygons is not None
        rle = {"size": list(segment.rle.size), "counts": segment.rle.counts.encode()}
        assert np.array_equal(coco_mask.decode(rle).astype(bool), mask), segment.segment_id
        assert int(coco_mask.area(rle)) == segment.area
        shape = shapely.MultiPolygon([(p[0], p[1:]) for p in segment.polygons])
        ys, xs = np.mgrid[0:height, 0:width]
        inside = shapely.contains_xy(shape, xs.ravel() + 0.5, ys.ravel() + 0.5).reshape(height, width)
        assert np.array_equal(inside, mask), segment.segment_id  # tolerance 0: exactly the pixel centres

    # The label map: painted in decreasing area (ties: increasing id), value segment_id + 1, 0 elsewhere.
    labels = np.asarray(Image.open(io.BytesIO(httpx.get(body.label_map_url, timeout=10).content)))
    assert labels.dtype == np.uint16 and labels.shape == (height, width)
    expected = np.zeros((height, width), np.uint16)
    for index in paint_order([int(m.sum()) for m in masks]):
        expected[masks[index]] = index + 1
    assert np.array_equal(labels, expected)
    overlay = Image.open(io.BytesIO(httpx.get(body.overlay_url, timeout=10).content))
    assert overlay.format == "JPEG" and overlay.size == (width, height)

    # A plain job is exactly what it always was: PNG masks, area order, no encodings, no extra files.
    (plain_patch,) = terminal(app_server, "opt-plain")
    plain_body = verified(plain_patch)
    assert plain_body.status == "completed" and plain_body.label_map_url is None and plain_body.overlay_url is None
    areas = [s.area for s in plain_body.segments]
    assert areas == sorted(areas, reverse=True)
    assert {"rle", "polygons"}.isdisjoint(json.loads(plain_patch.body)["segments"][0])
    plain_document = http.result(plain_body.result_url or "")
    assert plain_document.outputs == [] and all(s.rle is None for s in plain_document.segments)
    assert [r for r in app_server.requests if patches("opt-plain")(r)] == [plain_patch]  # no running event

    # The overlay of a wide image: long side 2048, aspect kept.
    wide_body = verified(terminal(app_server, "opt-wide")[0])
    wide_overlay = Image.open(io.BytesIO(httpx.get(wide_body.overlay_url or "", timeout=10).content))
    assert wide_overlay.size == overlay_size(2560, 320) == (2048, 256)
    assert len(segmented_lines(worker.output(), "opt-rich")) == 1


def test_expiry_cancel_and_every_resend_rule(
    stack: Any, http_server: LoopbackServer, app_server: LoopbackServer
) -> None:
    api = stack.start_api()
    worker = stack.start_worker()
    jobs, http = sqs_jobs(stack), HttpJobs(api, API_TOKEN)
    image = f"{http_server.url}/img/scene.png"

    # Expired: sent with a 10 s deadline but visible only after 15 s (SQS DelaySeconds): the model never runs.
    expiring = build_job("ctl-expired", image, ttl_seconds=10)
    jobs.sqs.send_message(QueueUrl=jobs.queue_url, MessageBody=expiring.model_dump_json(), DelaySeconds=15)
    # Invalid options over SQS: a `failed` callback naming the field.
    stack.send_raw(json.dumps({"uuid": "ctl-invalid", "image_url": image, "options": {"points_per_side": 3}}))
    # Long enough to be canceled in the middle: 64x64 prompts, told when segmentation starts.
    long_job = build_job("ctl-cancel", image, options={"points_per_side": 64}, events=["running"])
    jobs.send(long_job)

    invalid = verified(terminal(app_server, "ctl-invalid")[0])
    assert invalid.status == "failed" and invalid.error is not None
    assert invalid.error.code == "invalid_options" and "options.points_per_side" in invalid.error.message

    app_server.wait_for(lambda r: patches("ctl-cancel")(r) and json.loads(r.body)["status"] == "running", 240)
    # While it runs: the same uuid with another body is a conflict (dead-lettered, the run untouched) …
    jobs.send(build_job("ctl-cancel", image, options={"points_per_side": 64}, outputs=["label_map"]))
    with pytest.raises(httpx.HTTPStatusError) as conflict:
        http.submit(build_job("ctl-cancel", image, outputs=["coco_rle"]))
    assert conflict.value.response.status_code == 409
    # … and DELETE cancels it between decoder batches.
    asked = time.monotonic()
    status = http.cancel("ctl-cancel")
    assert status.status in ("running", "canceled")
    (canceled,) = terminal(app_server, "ctl-cancel", timeout=60)
    latency = time.monotonic() - asked
    assert verified(canceled).status == "canceled" and verified(canceled).segments == []
    assert latency < 20, f"the cancel took {latency:.1f} s to reach the app server"  # bound: docs/contract.md
    assert http.status("ctl-cancel").status.value == "canceled"
    assert segmented_lines(worker.output(), "ctl-cancel") == []  # stopped before its masks were written
    with pytest.raises(httpx.HTTPStatusError) as late:
        http.cancel("ctl-cancel")
    assert late.value.response.status_code == 409 and late.value.response.json()["detail"]["status"] == "canceled"
    dead = dead_letters(stack)
    assert [reason for reason, _ in dead if reason.startswith("uuid_conflict")], dead

    (expired,) = terminal(app_server, "ctl-expired", timeout=120)
    assert verified(expired).status == "failed" and verified(expired).error.code == "expired"  # type: ignore[union-attr]
    lines = [json.loads(line) for line in worker.output().splitlines() if line.startswith("{")]
    stages = {line.get("task") for line in lines if line.get("job_uuid") == "ctl-expired"}
    assert "samseg.segment" not in stages and segmented_lines(worker.output(), "ctl-expired") == []

    # Same body after `completed`: the same callback (body and webhook-id), no second model run.
    done = build_job("ctl-done", image)
    jobs.send(done)
    (first,) = terminal(app_server, "ctl-done")
    jobs.send(done)
    second = terminal(app_server, "ctl-done", count=2)[1]
    assert second.body == first.body and second.headers["webhook-id"] == first.headers["webhook-id"]
    assert len(segmented_lines(worker.output(), "ctl-done")) == 1
    # Another body after `completed`, or anything after `canceled`: a new run with a new webhook-id.
    jobs.send(build_job("ctl-done", image, outputs=["label_map"]))
    third = terminal(app_server, "ctl-done", count=3)[2]
    assert verified(third).label_map_url and third.headers["webhook-id"] != first.headers["webhook-id"]
    jobs.send(build_job("ctl-cancel", image))
    rerun = terminal(app_server, "ctl-cancel", count=2)[1]
    assert verified(rerun).status == "completed" and rerun.headers["webhook-id"] != canceled.headers["webhook-id"]


def dead_letters(stack: Any) -> list[tuple[str, str]]:
    """(reason, body) of the messages on the jobs dead-letter queue."""
    client = stack.sqs()
    url = client.get_queue_url(QueueName=f"{stack.jobs_queue}-dlq")["QueueUrl"]
    found: list[tuple[str, str]] = []
    for _ in range(5):
        reply = client.receive_message(
            QueueUrl=url, MaxNumberOfMessages=10, MessageAttributeNames=["All"], WaitTimeSeconds=1
        )
        for message in reply.get("Messages", []):
            found.append((message["MessageAttributes"]["samseg_error"]["StringValue"], message["Body"]))
        if found:
            break
    return found
