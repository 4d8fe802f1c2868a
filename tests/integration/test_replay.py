"""Fault: SQS delivers a stage's task message again after the job's run has finished.

This happens when a worker dies after a task finished but before its message was deleted. The copy is sent
with `celery call`, which puts the same task message on the same queue that SQS would hand out again; the
real worker must pass it through: no second callback, the status stays `completed`, the masks stay.
"""

from __future__ import annotations

import json
import subprocess
import time

import httpx

from tests.support import AUTH, VENV_BIN, Route, scene_png

CALLBACK = "/api/v1/re-imagine/auto-mask/"


def test_redelivered_stages_of_a_finished_run_are_passed_through(make_stack, http_server, app_server):
    http_server.routes["/r.png"] = Route(body=scene_png())
    stack = make_stack(SAMSEG_APP_SERVER_URL=app_server.url)
    api = stack.start_api()
    worker = stack.start_worker()
    uuid = "replay-1"
    stack.send_raw(json.dumps({"uuid": uuid, "image_url": f"{http_server.url}/r.png"}))
    (first,) = app_server.wait_for(lambda r: r.path == CALLBACK + uuid, timeout=180)
    status = httpx.get(f"{api}/jobs/{uuid}", headers=AUTH, timeout=10).json()
    assert status["status"] == "completed"
    done = first.json()
    job = {
        "uuid": uuid,
        "image_url": f"{http_server.url}/r.png",
        "run_id": status["run_id"],
        "width": done["image_width"],
        "height": done["image_height"],
        "mask_count": len(done["segments"]),
    }
    prefix = stack.env["SAMSEG_QUEUE_PREFIX"]
    for task, queue in [("samseg.persist", "io"), ("samseg.segment", "gpu"), ("samseg.notify", "io")]:
        subprocess.run(
            [
                str(VENV_BIN / "celery"),
                "-A",
                "samseg",
                "call",
                task,
                "--args",
                json.dumps([job]),
                "--queue",
                f"{prefix}{queue}",
            ],
            env=stack.env,
            check=True,
            capture_output=True,
            timeout=60,
        )
    # Each copy is told its run already ended (samseg.stores.lifecycle: Gone) and ends quietly: nothing published.
    refused = '"event": "lifecycle_stage_refused"'
    deadline = time.monotonic() + 90
    while (
        time.monotonic() < deadline
        and sum(refused in line and uuid in line for line in worker.output().splitlines()) < 3
    ):
        time.sleep(0.5)
    lines = [json.loads(line) for line in worker.output().splitlines() if line.startswith("{") and refused in line]
    gone = [line for line in lines if line.get("job_uuid") == uuid]
    assert sorted(line["stage"] for line in gone) == ["notify", "persist", "segment"], gone
    assert all("run already completed" in line["outcome"] for line in gone), gone
    # A refused copy publishes nothing, so no second callback attempt can be on its way.
    assert worker.output().count("Task samseg.deliver_callback[replay-1.callback] received") == 1
    assert len([r for r in app_server.requests if r.path == CALLBACK + uuid]) == 1
    after = httpx.get(f"{api}/jobs/{uuid}", headers=AUTH, timeout=10).json()
    assert after["status"] == "completed" and after["segments"] == status["segments"]
    assert httpx.get(done["segments"][0]["mask_url"], timeout=10).status_code == 200
