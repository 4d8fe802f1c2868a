"""samseg.ops.watchdog in real workers: time limits in the pools Celery does not enforce them in (solo, threads).

Worker tests run a real `samseg.download` in real `--pool threads` and `--pool solo` workers against an image
server that trickles one byte every 0.1 s forever (soft limit → job `failed` with `timeout`, worker keeps
serving) or never answers (hard limit → the worker ends itself with status 70). StageWatchdog itself, driven
by real threads in this process, is tests/unit/test_watchdog.py.
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from samseg.ops.watchdog import EXIT_HARD_TIMEOUT
from tests.faults_support import count_events, events, is_callback, wait_until


# --- real workers ------------------------------------------------------------------------------------------
class StallingImageServer:
    """/trickle: 200 with a large Content-Length, then one byte every 0.1 s forever. /silent: never answers."""

    def __init__(self) -> None:
        self.closing = threading.Event()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                if self.path == "/silent":
                    outer.closing.wait()
                    return
                self.send_response(200)
                self.send_header("Content-Type", "image/png")
                self.send_header("Content-Length", str(10_000_000))
                self.end_headers()
                try:
                    while not outer.closing.wait(0.1):
                        self.wfile.write(b"\0")
                        self.wfile.flush()
                except OSError:
                    pass

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.closing.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def stalling():
    server = StallingImageServer()
    yield server
    server.close()


POOLS = [("threads", "-c", "2"), ("solo",)]


def _io_worker(stack, pool: tuple[str, ...], name: str = "io"):
    queues = f"{stack.jobs_queue},{stack.env['SAMSEG_QUEUE_PREFIX']}io"
    return stack.start_worker("-Q", queues, "--pool", *pool, name=f"{name}-{pool[0]}")


@pytest.mark.parametrize("pool", POOLS, ids=lambda p: p[0])
def test_a_trickling_download_fails_with_timeout_and_the_worker_keeps_serving(
    make_stack, app_server, stalling, http_server, pool
):
    # Limits: io hard 5 s → soft 4 s; the download's own deadline (SAMSEG_DOWNLOAD_TIMEOUT_SECONDS) far later.
    stack = make_stack(
        SAMSEG_APP_SERVER_URL=app_server.url, SAMSEG_IO_TIME_LIMIT_SECONDS="5", SAMSEG_DOWNLOAD_TIMEOUT_SECONDS="600"
    )
    worker = _io_worker(stack, pool)
    ready = next(e for e in events(worker) if e.get("event") == "worker_ready")
    assert ready["time_limits_by"] == "samseg.ops.watchdog"
    stack.send_raw(json.dumps({"uuid": "trickle-1", "image_url": f"{stalling.url}/trickle"}))
    (patch,) = app_server.wait_for(is_callback("trickle-1"), timeout=60)
    body = patch.json()
    assert body["status"] == "failed" and body["error"]["code"] == "timeout", body
    soft = [e for e in events(worker) if e.get("event") == "task_soft_time_limit"]
    assert [(e["task_id"], e["delivered_to_thread"]) for e in soft] == [("trickle-1.download", True)]
    # Still serving: the next job (an image that is not there) gets its own callback.
    stack.send_raw(json.dumps({"uuid": "after-1", "image_url": f"{http_server.url}/missing.png"}))
    (after,) = app_server.wait_for(is_callback("after-1"), timeout=60)
    assert after.json()["error"]["code"] == "image_not_found"
    assert worker.popen.poll() is None


@pytest.mark.parametrize("pool", POOLS, ids=lambda p: p[0])
def test_a_download_stuck_in_a_c_call_ends_the_worker_with_its_own_status(make_stack, app_server, stalling, pool):
    stack = make_stack(
        SAMSEG_APP_SERVER_URL=app_server.url, SAMSEG_IO_TIME_LIMIT_SECONDS="3", SAMSEG_DOWNLOAD_TIMEOUT_SECONDS="600"
    )
    worker = _io_worker(stack, pool)
    stack.send_raw(json.dumps({"uuid": "stuck-1", "image_url": f"{stalling.url}/silent"}))
    assert worker.popen.wait(60) == EXIT_HARD_TIMEOUT, worker.output()[-3000:]
    logged = {e.get("event"): e for e in events(worker)}
    assert logged["task_soft_time_limit"]["task_id"] == "stuck-1.download"  # tried first, could not help
    hard = logged["task_hard_time_limit"]
    assert (hard["task_id"], hard["job_uuid"]) == ("stuck-1.download", "stuck-1")
    assert hard["sqs_message_known"] is True  # a hook can acknowledge the message (samseg.ops.watchdog.held_message)
    # The heartbeat said why just before the exit.
    assert (
        "past its hard time limit"
        in json.loads(Path(stack.env["SAMSEG_WORKER_HEARTBEAT_FILE"]).read_text())["problems"][0]
    )
    # samseg's hook (samseg.worker.failure.hung_task_hook) ended the run as failed with `timeout`, queued its
    # callback and acknowledged the stuck message; the next io worker sends that one callback, nothing is retried.
    replacement = _io_worker(stack, pool, name="io-2")
    (patch,) = app_server.wait_for(lambda r: r.method == "PATCH" and r.path.endswith("/stuck-1"), timeout=60)
    assert patch.json()["status"] == "failed" and patch.json()["error"]["code"] == "timeout"
    client = stack.sqs()
    url = client.get_queue_url(QueueName=stack.env["SAMSEG_QUEUE_PREFIX"] + "io")["QueueUrl"]

    def drained() -> bool:
        attrs = client.get_queue_attributes(
            QueueUrl=url, AttributeNames=["ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"]
        )["Attributes"]
        return attrs == {"ApproximateNumberOfMessages": "0", "ApproximateNumberOfMessagesNotVisible": "0"}

    wait_until(drained, 30, "the io queue empty: the stuck download was acknowledged, not redelivered")
    assert count_events(replacement, "stage_skipped") == 0
