"""Health, readiness and metrics against the real running system (moto SQS, worker, uvicorn API)."""

from __future__ import annotations

import json
import re
import subprocess
import time

import httpx

from tests.support import AUTH, VENV_BIN, Route, free_port, scene_png


def _healthcheck(env, *extra):
    return subprocess.run(
        [str(VENV_BIN / "samseg"), "healthcheck", "worker", *extra],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_worker_is_ready_only_after_model_warm_up_and_unhealthy_once_dead(make_stack, tmp_path):
    heartbeat = tmp_path / "hb.json"
    stack = make_stack(
        SAMSEG_WORKER_HEARTBEAT_FILE=str(heartbeat),
        SAMSEG_WORKER_HEARTBEAT_INTERVAL_SECONDS="1",
        SAMSEG_PRELOAD_MODEL="true",
    )
    assert _healthcheck(stack.env).returncode == 1  # no worker yet
    worker = stack.start_worker()
    worker.wait_for_output('"model_ready"', 120)
    deadline = time.monotonic() + 30
    while (result := _healthcheck(stack.env)).returncode != 0 and time.monotonic() < deadline:
        time.sleep(0.5)
    assert result.returncode == 0 and "ready" in result.stdout, result.stdout
    log = worker.output()
    # The ready announcement comes after the warm-up inference, never before.
    assert log.index('"model_ready"') < log.index('"worker_accepting_jobs"')
    worker.kill()
    worker.popen.wait(10)
    failed = _healthcheck(stack.env)
    assert failed.returncode == 1 and "gone" in failed.stdout


def test_io_only_worker_is_ready_without_a_model(make_stack, tmp_path):
    heartbeat = tmp_path / "hb.json"
    stack = make_stack(SAMSEG_WORKER_HEARTBEAT_FILE=str(heartbeat), SAMSEG_WORKER_HEARTBEAT_INTERVAL_SECONDS="1")
    worker = stack.start_worker("-Q", f"{stack.jobs_queue},{stack.env['SAMSEG_QUEUE_PREFIX']}io")
    worker.wait_for_output('"worker_accepting_jobs"', 60)
    assert json.loads(heartbeat.read_text())["ready"] is True
    assert '"model_ready"' not in worker.output()  # an I/O worker never loads SAM-2
    assert _healthcheck(stack.env).returncode == 0


def test_readyz_fails_while_the_broker_is_down(make_stack):
    # Fault: SQS endpoint pointing at a closed port (nothing listens there).
    down = make_stack(AWS_ENDPOINT_URL_SQS=f"http://127.0.0.1:{free_port()}")
    api = down.start_api()
    response = httpx.get(f"{api}/readyz", timeout=60)
    assert response.status_code == 503
    checks = response.json()["checks"]
    assert checks["broker"]["ok"] is False and checks["blob_store"]["ok"] is True and checks["job_store"]["ok"] is True


def test_readyz_passes_and_reports_low_disk(make_stack):
    stack = make_stack()
    stack.start("queues", str(VENV_BIN / "samseg"), "queues", "ensure").popen.wait(60)
    api = stack.start_api()
    assert httpx.get(f"{api}/readyz", timeout=30).status_code == 200
    # Fault: a free-disk threshold no disk can meet.
    low = make_stack(SAMSEG_MIN_FREE_DISK_BYTES=str(2**62))
    low.env["SAMSEG_QUEUE_PREFIX"] = stack.env["SAMSEG_QUEUE_PREFIX"]
    low.env["SAMSEG_JOBS_QUEUE"] = stack.jobs_queue
    api_low = low.start_api()
    response = httpx.get(f"{api_low}/readyz", timeout=30)
    assert response.status_code == 503 and response.json()["checks"]["disk_free"]["ok"] is False


def _sample(text: str, name: str, **labels: str) -> float | None:
    """The sample's value, or None when the exposition has no such sample: a missing metric never compares
    equal to a number, so `_sample(...) == 0` cannot pass for a metric that was renamed or never exported."""
    label_text = ",".join(f'{k}="{v}"' for k, v in labels.items())
    pattern = r"^" + re.escape(name) + (r"\{" + re.escape(label_text) + r"\}" if labels else "") + r" ([0-9.e+-]+)$"
    match = re.search(pattern, text, re.MULTILINE)
    return float(match.group(1)) if match else None


def test_metrics_move_after_a_job(make_stack, http_server, app_server):
    """The all-in-one worker serves its own /metrics (SAMSEG_METRICS_PORT); the API serves queue depth."""
    http_server.routes["/m.png"] = Route(body=scene_png())
    port = free_port()
    stack = make_stack(SAMSEG_APP_SERVER_URL=app_server.url, SAMSEG_METRICS_PORT=str(port))
    stack.env["SAMSEG_METRICS_PORT"] = "0"  # the API has no metrics port of its own
    api = stack.start_api()
    stack.env["SAMSEG_METRICS_PORT"] = str(port)
    stack.start_worker()
    worker = f"http://127.0.0.1:{port}/metrics"
    before = httpx.get(worker, timeout=30).text
    # No job has finished: the labelled counter has no sample at all yet (prometheus_client exports a child
    # only once it is used). After the job, the same sample must exist and read 1 (`None == 1` fails).
    assert "samseg_jobs_total" not in before, before
    deadline = time.monotonic() + 30
    while (
        f'samseg_queue_depth{{queue="{stack.jobs_queue}"}}'
        not in httpx.get(f"{api}/metrics", headers=AUTH, timeout=30).text
    ):
        assert time.monotonic() < deadline, "no queue depth on the API's /metrics"
        time.sleep(0.5)

    stack.send_raw(json.dumps({"uuid": "metrics-1", "image_url": f"{http_server.url}/m.png"}))
    (patch,) = app_server.wait_for(lambda r: r.method == "PATCH", timeout=180)
    masks = len(patch.json()["segments"])
    deadline = time.monotonic() + 30
    # The notify task's postrun records its duration just after the callback.
    while (
        _sample(after := httpx.get(worker, timeout=30).text, "samseg_stage_duration_seconds_count", stage="notify") or 0
    ) < 1:
        assert time.monotonic() < deadline, after
        time.sleep(0.2)

    assert _sample(after, "samseg_jobs_total", outcome="completed") == 1
    for stage in ("download", "segment", "persist", "notify"):
        assert _sample(after, "samseg_stage_duration_seconds_count", stage=stage) == 1, stage
    assert _sample(after, "samseg_masks_per_job_count") == 1
    assert _sample(after, "samseg_masks_per_job_sum") == masks
    assert _sample(after, "samseg_callbacks_total", result="delivered") == 1
    free = _sample(httpx.get(f"{api}/metrics", headers=AUTH, timeout=30).text, "samseg_assets_free_bytes")
    assert free is not None and free > 0
