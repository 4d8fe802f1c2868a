"""End to end: a raw JSON job on SQS → real Celery worker → SAM-2 → PNGs on the API → PATCH callback.

Real: moto's SQS server (AWS stand-in), kombu's SQS transport, `celery -A samseg worker`, the SAM-2 model
built from the packaged sam2.1_hiera_t config, uvicorn serving samseg.api, loopback HTTP servers for the
image host and the app server. Stand-in: the weights are random (Meta's cannot be downloaded here), so the
mask filters are switched off to keep masks (see conftest).
"""

from __future__ import annotations

import io
import json

import httpx
import numpy as np
from PIL import Image

from tests.support import AUTH, Route, scene_png

CALLBACK_PREFIX = "/api/v1/re-imagine/auto-mask/"


def _patches(app_server, uuid):
    return lambda r: r.method == "PATCH" and r.path == CALLBACK_PREFIX + uuid


def test_job_completes_with_masks_that_match_the_callback(make_stack, http_server, app_server):
    width, height = 128, 96
    http_server.routes["/img/scene.png"] = Route(body=scene_png(width, height), headers={"Content-Type": "image/png"})
    stack = make_stack(SAMSEG_APP_SERVER_URL=app_server.url, SAMSEG_APP_SERVER_TOKEN="s3cret")
    api = stack.start_api()
    worker = stack.start_worker()

    uuid = "e2e-ok-1"
    stack.send_raw(json.dumps({"uuid": uuid, "image_url": f"{http_server.url}/img/scene.png"}))

    (patch,) = app_server.wait_for(_patches(app_server, uuid), timeout=240)
    assert patch.headers.get("Authorization") == "Bearer s3cret"
    body = patch.json()
    assert body["uuid"] == uuid and body["status"] == "completed"
    segments = body["segments"]
    assert len(segments) > 0
    for index, seg in enumerate(segments):
        assert seg["segment_id"] == index
        assert seg["mask_url"] == f"{api}/assets/{uuid}/mask_images/mask_{index:03d}.png"
        assert set(seg) >= {"bbox", "area", "stability_score", "predicted_iou", "center_point"}
        png = httpx.get(seg["mask_url"], timeout=10)
        assert png.status_code == 200 and png.headers["content-type"] == "image/png"
        image = Image.open(io.BytesIO(png.content))
        assert image.size == (width, height)
        mask = np.asarray(image.convert("L")) > 0
        ys, xs = np.nonzero(mask)
        bbox = seg["bbox"]
        assert bbox == {
            "x": int(xs.min()),
            "y": int(ys.min()),
            "width": int(xs.max() - xs.min() + 1),
            "height": int(ys.max() - ys.min() + 1),
        }
        assert seg["area"] == int(mask.sum())
        assert seg["center_point"] == {"x": bbox["x"] + bbox["width"] // 2, "y": bbox["y"] + bbox["height"] // 2}
    areas = [s["area"] for s in segments]
    assert areas == sorted(areas, reverse=True)

    # The same body is on disk and the job status reports it.
    on_disk = httpx.get(f"{api}/assets/{uuid}/result.json", timeout=10).json()
    assert on_disk["segments"] == segments
    status = httpx.get(f"{api}/jobs/{uuid}", headers=AUTH, timeout=10).json()
    assert status["status"] == "completed" and len(status["segments"]) == len(segments)
    assert status["callback"]["delivered"] is True
    # Exactly one callback for the job.
    assert len([r for r in app_server.requests if r.path == CALLBACK_PREFIX + uuid]) == 1

    # Structured logs: every JSON line about this job names the job and the task that wrote it.
    lines = [json.loads(line) for line in worker.output().splitlines() if line.startswith("{")]
    about_job = [line for line in lines if uuid in json.dumps(line)]
    tasks_seen = {line.get("task") for line in about_job}
    assert {"ingress", "samseg.download", "samseg.segment", "samseg.persist", "samseg.notify"} <= tasks_seen
    for line in about_job:
        assert line.get("job_uuid") == uuid and line.get("task"), line


def test_image_404_gives_failed_callback(make_stack, http_server, app_server):
    stack = make_stack(SAMSEG_APP_SERVER_URL=app_server.url)
    api = stack.start_api()
    stack.start_worker()

    uuid = "e2e-missing-1"
    stack.send_raw(json.dumps({"uuid": uuid, "image_url": f"{http_server.url}/img/nope.png"}))

    (patch,) = app_server.wait_for(_patches(app_server, uuid), timeout=120)
    body = patch.json()
    assert body == {
        "uuid": uuid,
        "status": "failed",
        "segments": [],
        "error": {"code": "image_not_found", "message": body["error"]["message"]},
    }
    assert "404" in body["error"]["message"]
    status = httpx.get(f"{api}/jobs/{uuid}", headers=AUTH, timeout=10).json()
    assert status["status"] == "failed" and status["error"]["code"] == "image_not_found"
    assert not (stack.assets / uuid).exists()
