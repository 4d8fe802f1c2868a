"""samseg.ops.watchdog: time limits in the pools Celery does not enforce them in (solo, threads).

In-process tests drive StageWatchdog with real threads — a pure-Python loop (the soft limit interrupts it)
and a thread blocked in a C call that never returns to Python (`select()` on a pipe nobody writes: no
exception can reach it). Worker tests run a real `samseg.download` in real `--pool threads` and `--pool solo`
workers against an image server that trickles one byte every 0.1 s forever (soft limit → job `failed` with
`timeout`, worker keeps serving) or never answers (hard limit → the worker ends itself with status 70).
"""

from __future__ import annotations

import json
import os
import select
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from celery.exceptions import SoftTimeLimitExceeded

from samseg.ops.health import Heartbeat, worker_health
from samseg.ops.watchdog import EXIT_HARD_TIMEOUT, StageWatchdog
from tests.faults_support import count_events, events, is_callback, wait_until


def _run_in_thread(target) -> tuple[threading.Thread, dict[str, Any]]:
    outcome: dict[str, Any] = {}

    def wrapper() -> None:
        try:
            outcome["result"] = target()
        except BaseException as exc:  # what the watchdog raised in this thread
            outcome["raised"] = exc

    thread = threading.Thread(target=wrapper, daemon=True)
    thread.start()
    return thread, outcome


def test_soft_limit_interrupts_python_code_in_the_tasks_thread():
    watchdog = StageWatchdog(interval=0.05)
    watchdog.start()
    started = threading.Event()

    def task() -> int:
        watchdog.task_started("t1", "samseg.download", soft=0.3, hard=30)
        started.set()
        n = 0
        try:
            while True:  # pure Python: the pending exception is raised at the next bytecode
                n += 1
        finally:
            watchdog.task_finished("t1")

    thread, outcome = _run_in_thread(task)
    thread.join(10)
    watchdog.stop()
    assert started.is_set() and not thread.is_alive()
    assert isinstance(outcome.get("raised"), SoftTimeLimitExceeded), outcome
    assert watchdog.running() == [] and watchdog.problems() == []


def test_hard_limit_on_a_c_call_runs_the_hook_reports_unhealthy_then_exits(tmp_path):
    read_end, write_end = os.pipe()
    hook_entered, hook_release = threading.Event(), threading.Event()
    exits: list[int] = []
    hooked: list[Any] = []

    def hook(task) -> None:
        hooked.append(task)
        hook_entered.set()
        hook_release.wait(10)

    def fake_exit(code: int) -> None:  # os._exit would end pytest; the real one is used by the worker tests
        exits.append(code)
        os.write(write_end, b"x")  # lets the stuck thread return so the test can end

    watchdog = StageWatchdog(hook, interval=0.05, hook_timeout=10, exit_process=fake_exit)
    watchdog.start()

    def task() -> None:
        watchdog.task_started("t2", "samseg.segment", soft=0.2, hard=0.6, args=({"uuid": "job-2", "run_id": "r"},))
        select.select([read_end], [], [], 1000)  # blocks in C; async exceptions cannot reach it

    thread, outcome = _run_in_thread(task)
    assert hook_entered.wait(10), "the hard-timeout hook never ran"
    (task_seen,) = hooked
    assert (task_seen.task_id, task_seen.name, task_seen.job) == (
        "t2",
        "samseg.segment",
        {"uuid": "job-2", "run_id": "r"},
    )
    assert thread.is_alive()  # the soft limit was sent but could not interrupt the C call

    # While the hook runs the worker is unhealthy: the heartbeat says why and the health check fails.
    heartbeat_file = tmp_path / "hb"
    Heartbeat(heartbeat_file, 1, "test", needs_model=False, problems=watchdog.problems).beat()
    health = worker_health(heartbeat_file, 1)
    assert not health.alive and "past its hard time limit" in health.reason, health
    assert json.loads(heartbeat_file.read_text())["problems"]

    hook_release.set()
    wait_until(lambda: exits, 10, "the exit call")
    assert exits == [EXIT_HARD_TIMEOUT]
    thread.join(10)
    # Back in Python, the stuck thread got the soft limit's pending exception.
    assert isinstance(outcome.get("raised"), SoftTimeLimitExceeded), outcome
    os.close(read_end)
    os.close(write_end)


def test_a_hook_that_hangs_does_not_keep_the_process_alive():
    exits: list[int] = []
    never = threading.Event()
    watchdog = StageWatchdog(lambda task: never.wait(), interval=0.05, hook_timeout=0.5, exit_process=exits.append)
    watchdog.start()
    watchdog.task_started("t3", "samseg.notify", soft=None, hard=0.1)  # this thread stands in for the task
    wait_until(lambda: exits, 10, "the exit despite a hung hook")
    assert exits == [EXIT_HARD_TIMEOUT]
    watchdog.task_finished("t3")


def test_a_task_that_finishes_in_time_is_left_alone():
    exits: list[int] = []
    watchdog = StageWatchdog(interval=0.02, exit_process=exits.append)
    watchdog.start()
    for i in range(50):
        watchdog.task_started(f"ok{i}", "samseg.persist", soft=5, hard=10)
        watchdog.task_finished(f"ok{i}")
    watchdog.task_started("slow", "samseg.persist", soft=0.05, hard=None)
    time.sleep(0.01)
    watchdog.task_finished("slow")  # finished before the deadline: nothing is sent
    wait_until(lambda: watchdog.running() == [], 5, "an empty watch list")
    watchdog.stop()
    watchdog.join(5)
    assert exits == []


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


def test_the_watchdog_covers_every_pool_celery_enforces_no_limit_in():
    from celery.concurrency.prefork import TaskPool as Prefork
    from celery.concurrency.solo import TaskPool as Solo
    from celery.concurrency.thread import TaskPool as Threads

    from samseg.ops.watchdog import watches_pool
    from samseg.worker.pool import ModelThreadPool

    assert watches_pool(Solo) and watches_pool(Threads) and watches_pool(ModelThreadPool)  # the GPU worker's
    assert not watches_pool(Prefork)
