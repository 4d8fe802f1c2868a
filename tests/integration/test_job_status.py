"""GET /jobs/{uuid} follows a real job through its stages (queued → running/stage → completed).

Real worker, real API (POST /jobs enqueues the raw JSON on moto's SQS), real SAM-2 with random weights.
The image server answers slowly on purpose so the download stage is observable.
"""

from __future__ import annotations

import time

import httpx

from tests.support import AUTH, Route, scene_png


def test_status_reports_stages_of_running_and_finished_job(make_stack, http_server, app_server):
    http_server.routes["/slow.png"] = Route(body=scene_png(), headers={"Content-Type": "image/png"}, delay=1.5)
    stack = make_stack(SAMSEG_APP_SERVER_URL=app_server.url)
    api = stack.start_api()
    stack.start_worker()

    uuid = "status-1"
    assert httpx.get(f"{api}/jobs/{uuid}", headers=AUTH, timeout=10).status_code == 404
    accepted = httpx.post(
        f"{api}/jobs", json={"uuid": uuid, "image_url": f"{http_server.url}/slow.png"}, headers=AUTH, timeout=30
    )
    assert accepted.status_code == 202
    assert accepted.json()["status"] == "queued"
    assert accepted.json()["status_url"].endswith(f"/jobs/{uuid}")

    seen: list[tuple[str, str | None]] = []
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        status = httpx.get(f"{api}/jobs/{uuid}", headers=AUTH, timeout=10).json()
        step = (status["status"], status.get("stage"))
        if not seen or seen[-1] != step:
            seen.append(step)
        if status["status"] in {"completed", "failed"}:
            break
        time.sleep(0.1)

    assert seen[0] == ("queued", None)
    assert ("running", "download") in seen and ("running", "segment") in seen
    assert seen[-1] == ("completed", None), seen
    order = ["download", "segment", "persist", "notify"]
    stages = [order.index(stage) for state, stage in seen if state == "running"]
    assert stages == sorted(stages), f"stages went backwards: {seen}"
    # `completed` is written with the callback queued in the outbox; its delivery is recorded right after.
    final = _until(lambda: httpx.get(f"{api}/jobs/{uuid}", headers=AUTH, timeout=10).json(), _callback_closed)
    assert final["status"] == "completed" and final["segments"]
    callback = final["callback"]
    assert (callback["state"], callback["delivered"], callback["attempts"], callback["http_status"]) == (
        "delivered",
        True,
        1,
        200,
    )
    assert callback.get("next_attempt_at") is None and callback["first_attempt_at"] <= final["updated_at"]


def _callback_closed(status: dict) -> bool:
    return (status.get("callback") or {}).get("state") not in (None, "pending", "sending")


def _until(read, done, timeout: float = 30.0) -> dict:
    deadline = time.monotonic() + timeout
    value = read()
    while not done(value) and time.monotonic() < deadline:
        time.sleep(0.1)
        value = read()
    return value


def test_unknown_and_unsafe_job_ids_are_404(make_stack):
    stack = make_stack()
    api = stack.start_api()
    for uuid in ["never-seen", "..", "%2e%2e%2fetc", "a%00b"]:
        assert httpx.get(f"{api}/jobs/{uuid}", headers=AUTH, timeout=10).status_code == 404
    bad = httpx.post(f"{api}/jobs", json={"uuid": "../x", "image_url": "http://x/y.png"}, headers=AUTH, timeout=10)
    assert bad.status_code == 422
