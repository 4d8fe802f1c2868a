"""samseg.ops.watchdog: time limits in the pools Celery does not enforce them in (solo, threads).

In-process tests drive StageWatchdog with real threads — a pure-Python loop (the soft limit interrupts it)
and a thread blocked in a C call that never returns to Python (`select()` on a pipe nobody writes: no
exception can reach it). The same limits in real workers are tests/integration/test_watchdog_workers.py.
"""

from __future__ import annotations

import json
import os
import select
import threading
import time
from typing import Any

from celery.exceptions import SoftTimeLimitExceeded

from samseg.ops.health import Heartbeat, worker_health
from samseg.ops.watchdog import EXIT_HARD_TIMEOUT, StageWatchdog
from tests.faults_support import wait_until


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


def test_the_watchdog_covers_every_pool_celery_enforces_no_limit_in():
    from celery.concurrency.prefork import TaskPool as Prefork
    from celery.concurrency.solo import TaskPool as Solo
    from celery.concurrency.thread import TaskPool as Threads

    from samseg.ops.watchdog import watches_pool
    from samseg.worker.pool import ModelThreadPool

    assert watches_pool(Solo) and watches_pool(Threads) and watches_pool(ModelThreadPool)  # the GPU worker's
    assert not watches_pool(Prefork)
