"""Several hosts, no shared directory: S3 for files, DynamoDB for job state, SQS in between (issue 8).

Each process — an io worker, a segment worker, the API — gets a private SAMSEG_ASSETS_DIR of its own (three
temp dirs: three "hosts") and the same SAMSEG_STORAGE_URL=s3://… and SAMSEG_JOB_STORE_URL=dynamodb://….
AWS itself is the one stand-in: moto's server on loopback speaks the real SQS, S3 and DynamoDB protocols.
Workers, kombu's transport, SAM-2's model code (random weights), uvicorn and the HTTP servers are real.
"""

from __future__ import annotations

import io
import json
import secrets
import signal
import time
from pathlib import Path
from typing import Any

import boto3
import httpx
import numpy as np
import pytest
from PIL import Image

from tests.faults_support import count_events, is_callback, settled_callbacks, task_received, wait_until
from tests.support import AUTH, Route, scene_png

VISIBILITY = 30


def _aws(moto_url: str, service: str) -> Any:
    return boto3.client(
        service,
        endpoint_url=moto_url,
        region_name="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )


@pytest.fixture
def shared_aws(moto_url: str) -> dict[str, str]:
    """A fresh bucket (the operator creates it, as in production) and table name for one deployment."""
    bucket = f"samseg-{secrets.token_hex(4)}"
    _aws(moto_url, "s3").create_bucket(Bucket=bucket)
    return {
        "SAMSEG_STORAGE_URL": f"s3://{bucket}/prod",
        "SAMSEG_JOB_STORE_URL": f"dynamodb://samseg-jobs-{secrets.token_hex(4)}",
    }


def _host(tmp_path: Path, name: str) -> dict[str, str]:
    """A process's own 'host': its assets dir and heartbeat file, shared with nobody."""
    root = tmp_path / f"host-{name}"
    root.mkdir()
    return {"SAMSEG_ASSETS_DIR": str(root / "assets"), "SAMSEG_WORKER_HEARTBEAT_FILE": str(root / "heartbeat")}


def _objects(moto_url: str, storage_url: str, prefix: str = "") -> list[str]:
    bucket, _, base = storage_url.removeprefix("s3://").partition("/")
    listing = _aws(moto_url, "s3").list_objects_v2(Bucket=bucket, Prefix=f"{base}/{prefix}")
    return sorted(item["Key"][len(base) + 1 :] for item in listing.get("Contents", []))


def _mask_matches(png: bytes, segment: dict[str, Any]) -> list[str]:
    mask = np.asarray(Image.open(io.BytesIO(png)).convert("L")) > 0
    ys, xs = np.nonzero(mask)
    bbox = {"x": int(xs.min()), "y": int(ys.min()), "width": int(np.ptp(xs) + 1), "height": int(np.ptp(ys) + 1)}
    problems = []
    if bbox != segment["bbox"]:
        problems.append(f"mask {segment['segment_id']}: bbox {bbox} != {segment['bbox']}")
    if int(mask.sum()) != segment["area"]:
        problems.append(f"mask {segment['segment_id']}: area {int(mask.sum())} != {segment['area']}")
    return problems


def _start_three_hosts(stack: Any, tmp_path: Path) -> tuple[str, Any, Any]:
    api = stack.start_api(env=_host(tmp_path, "api"))
    io_worker = stack.start_worker(
        "-Q", f"{stack.jobs_queue},{stack.env['SAMSEG_QUEUE_PREFIX']}io", "--pool", "threads", "-c", "4",
        name="worker-io", env=_host(tmp_path, "io"),
    )  # fmt: skip
    gpu_worker = stack.start_worker(
        "-Q", f"{stack.env['SAMSEG_QUEUE_PREFIX']}gpu", "--pool", "solo", name="worker-gpu", env=_host(tmp_path, "gpu")
    )
    return api, io_worker, gpu_worker


def test_job_completes_across_three_hosts_without_a_shared_directory(
    make_stack, http_server, app_server, shared_aws, moto_url, tmp_path, monkeypatch
):
    width, height = 128, 96
    http_server.routes["/img/scene.png"] = Route(body=scene_png(width, height), headers={"Content-Type": "image/png"})
    stack = make_stack(SAMSEG_APP_SERVER_URL=app_server.url, **shared_aws)
    api, io_worker, gpu_worker = _start_three_hosts(stack, tmp_path)

    uuid = "scale-out-1"
    stack.send_raw(json.dumps({"uuid": uuid, "image_url": f"{http_server.url}/img/scene.png"}))
    (patch,) = app_server.wait_for(is_callback(uuid), timeout=240)
    body = patch.json()
    assert body["status"] == "completed" and body["segments"], body

    # Every mask downloads through the API (which never saw a file of its own) and matches its segment.
    for segment in body["segments"]:
        response = httpx.get(segment["mask_url"], timeout=10)
        assert response.status_code == 200 and response.headers["content-type"] == "image/png"
        assert int(response.headers["content-length"]) == len(response.content)
        assert response.headers["etag"] and "private" in response.headers["cache-control"]
        assert Image.open(io.BytesIO(response.content)).size == (width, height)
        assert _mask_matches(response.content, segment) == []
    assert httpx.get(f"{api}/assets/{uuid}/mask_images/mask_999.png", timeout=10).status_code == 404

    # The stages ran where they were meant to, and nothing was handed over through a directory.
    assert count_events(io_worker, "image_downloaded", uuid) == 1
    assert count_events(gpu_worker, "image_segmented", uuid) == 1
    assert count_events(io_worker, "masks_persisted", uuid) == 1
    for host in ("api", "io", "gpu"):
        files = [p for p in (tmp_path / f"host-{host}").rglob("*") if p.is_file() and uuid in str(p)]
        assert files == [], f"{host} kept job files locally: {files}"
    keys = _objects(moto_url, shared_aws["SAMSEG_STORAGE_URL"], f"{uuid}/")
    assert keys == [f"{uuid}/mask_images/mask_{i:03d}.png" for i in range(len(body["segments"]))] + [
        f"{uuid}/result.json"
    ]
    assert _objects(moto_url, shared_aws["SAMSEG_STORAGE_URL"], ".samseg/work/") == []  # work files cleaned up

    # GET /jobs answers from the table, which holds what the workers wrote.
    status = httpx.get(f"{api}/jobs/{uuid}", headers=AUTH, timeout=10).json()
    assert status["status"] == "completed" and len(status["segments"]) == len(body["segments"])
    table = shared_aws["SAMSEG_JOB_STORE_URL"].removeprefix("dynamodb://")
    item = _aws(moto_url, "dynamodb").get_item(TableName=table, Key={"uuid": {"S": uuid}}, ConsistentRead=True)["Item"]
    assert item["status"]["S"] == "completed" and item["run_id"]["S"] == status["run_id"]
    assert int(item["expires_at"]["N"]) > time.time() + 3600  # the record carries its TTL

    # The purge (as the beat task runs it, an hour later) removes the expired job's objects, not its record.
    for key, value in {**stack.env, **shared_aws}.items():
        monkeypatch.setenv(key, value)
    from samseg.core.settings import Settings
    from samseg.stores import build_stores
    from samseg.stores.purge import purge_expired

    settings = Settings()
    stores = build_stores(settings)
    report = wait_until(
        lambda: (r := purge_expired(stores, settings, now=time.time() + settings.asset_ttl_seconds + 60))["jobs"] and r,
        15,
        "the purge index to list the job",
    )
    assert report["objects"] == len(keys)
    assert _objects(moto_url, shared_aws["SAMSEG_STORAGE_URL"], f"{uuid}/") == []
    assert httpx.get(body["segments"][0]["mask_url"], timeout=10).status_code == 404
    after = httpx.get(f"{api}/jobs/{uuid}", headers=AUTH, timeout=10).json()
    assert after["status"] == "completed" and "segments" not in after


def test_worker_sigkilled_during_segment_completes_once_with_s3_and_dynamodb(
    make_stack, http_server, app_server, shared_aws, moto_url, tmp_path
):
    """Fault: SIGKILL of the segment worker's process group mid-segment, on the three-host layout. Outcome:
    the segment message comes back after the visibility timeout to a fresh segment worker on another host,
    which reads the run's work files from S3: exactly one `completed` callback, every mask served, no work
    objects left; download is not repeated."""
    http_server.routes["/img/scene.png"] = Route(body=scene_png(), headers={"Content-Type": "image/png"})
    stack = make_stack(
        SAMSEG_APP_SERVER_URL=app_server.url,
        SAMSEG_VISIBILITY_TIMEOUT_SECONDS=str(VISIBILITY),
        SAMSEG_SEGMENT_TIME_LIMIT_SECONDS="60",
        # The killed holder's stage lease runs out before its message comes back (docs/operations.md).
        SAMSEG_STAGE_LEASE_SECONDS="10",
        SAMSEG_AMG_POINTS_PER_SIDE="2",
        **shared_aws,
    )
    api, _io_worker, gpu_worker = _start_three_hosts(stack, tmp_path)
    uuid = "scale-out-kill"
    stack.send_raw(json.dumps({"uuid": uuid, "image_url": f"{http_server.url}/img/scene.png"}))
    wait_until(
        lambda: httpx.get(f"{api}/jobs/{uuid}", headers=AUTH, timeout=5).json().get("stage") == "segment",
        90,
        "segment to start",
    )
    time.sleep(1.0)  # into the stage: the model loads on first use
    gpu_worker.kill(signal.SIGKILL)
    gpu_worker.popen.wait(10)
    assert count_events(gpu_worker, "image_segmented", uuid) == 0, "segment finished before the kill: no test"
    assert _objects(moto_url, shared_aws["SAMSEG_STORAGE_URL"], f"{uuid}/") == []

    replacement = stack.start_worker(
        "-Q",
        f"{stack.env['SAMSEG_QUEUE_PREFIX']}gpu",
        "--pool",
        "solo",
        name="worker-gpu-2",
        env=_host(tmp_path, "gpu2"),
    )
    app_server.wait_for(is_callback(uuid), timeout=VISIBILITY + 150)
    wait_until(lambda: task_received(replacement, uuid, "segment") >= 1, 10, "the redelivered segment")
    sent = settled_callbacks(stack, app_server, uuid, timeout=150)
    assert len(sent) == 1
    body = sent[0].json()
    assert body["status"] == "completed" and body["segments"]
    for segment in body["segments"]:
        assert _mask_matches(httpx.get(segment["mask_url"], timeout=10).content, segment) == []
    assert task_received(replacement, uuid, "download") == 0
    assert _objects(moto_url, shared_aws["SAMSEG_STORAGE_URL"], ".samseg/work/") == []
    assert httpx.get(f"{api}/jobs/{uuid}", headers=AUTH, timeout=10).json()["status"] == "completed"


@pytest.mark.parametrize("mode", ["proxy", "redirect"])
def test_api_serves_s3_assets_by_streaming_or_by_presigned_redirect(make_stack, shared_aws, moto_url, tmp_path, mode):
    from samseg.core.contracts import CallbackBody
    from samseg.core.masks import PackedMasks, write_packed_masks
    from samseg.stores.layout import Assets
    from tests.faults_support import stack_stores

    stack = make_stack(SAMSEG_S3_ASSETS=mode, **shared_aws)
    _, stores = stack_stores(stack.env)
    rng = np.random.default_rng(1)
    write_packed_masks(tmp_path / "m.npy", [rng.random((12, 20)) > 0.5 for _ in range(2)], 2, 12, 20)
    body = CallbackBody(uuid="s3-served", status="completed", segments=[])
    Assets(stores.blobs).publish("s3-served", PackedMasks(tmp_path / "m.npy", 20), body)
    api = stack.start_api(env=_host(tmp_path, "api"))
    url = f"{api}/assets/s3-served/mask_images/mask_001.png"
    first = httpx.get(url, timeout=10)
    if mode == "redirect":
        assert first.status_code == 307 and first.headers["location"].startswith(moto_url)
        assert "Signature" in first.headers["location"] or "X-Amz-Signature" in first.headers["location"]
        followed = httpx.get(url, timeout=10, follow_redirects=True)
        assert followed.status_code == 200 and followed.content.startswith(b"\x89PNG")
    else:
        assert first.status_code == 200 and first.content.startswith(b"\x89PNG")
        assert first.headers["content-type"] == "image/png" and first.headers["etag"]
    assert httpx.get(f"{api}/assets/s3-served/mask_images/mask_002.png", timeout=10).status_code == 404
    assert httpx.get(f"{api}/assets/never-published/mask_images/mask_000.png", timeout=10).status_code == 404
