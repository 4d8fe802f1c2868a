"""Time limits for the pools where Celery enforces none: `--pool solo` (GPU workers) and `--pool threads`.

Celery enforces `soft_time_limit` / `time_limit` only in the prefork pool (celery#8395). samseg's GPU worker
runs solo and `samseg up`'s io worker runs threads, so without this a hung CUDA call or a stalled socket
keeps a job `running` forever while the visibility keeper extends its message and the heartbeat says healthy.

The worker's main process — where solo and threads pools run their tasks — tracks every running task
(task_prerun / task_postrun, wired in samseg.worker.app) with the deadlines Celery itself would use: the
message's `timelimit` header, else the task's `time_limit` / `soft_time_limit` (for samseg's io tasks,
`SAMSEG_IO_TIME_LIMIT_SECONDS` via samseg.worker.config; segment and notify set their own). A thread checks them:

- **Soft deadline:** `SoftTimeLimitExceeded` is raised in the task's own thread (CPython's
  `PyThreadState_SetAsyncExc`). That works wherever Python code runs — a loop, a socket that returns data
  now and then — and the task fails the usual way (its errback records `timeout`).
- **Hard deadline:** the task is stuck in a C call that never returns to Python (a hung CUDA kernel, a read
  from a peer that sends nothing), so no exception can reach it. The watchdog marks the worker unhealthy
  (`problems()`, reported by the heartbeat), calls `on_hard_timeout(task)` — where the job is failed with
  `timeout`, its callback queued and its message acknowledged — bounded by `hook_timeout`, then ends the
  whole process with `EXIT_HARD_TIMEOUT` so the orchestrator restarts it. Its visibility extensions stop with
  it. Other tasks running in the same process (threads pool) die too; their messages were not acknowledged,
  so SQS delivers them again.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import structlog

from samseg.core.settings import Settings

log = structlog.get_logger(__name__)

EXIT_HARD_TIMEOUT = 70  # EX_SOFTWARE: "the worker ended itself after a task passed its hard time limit"


@dataclass
class RunningTask:
    """One task the watchdog watches (times are `time.monotonic()` values)."""

    task_id: str
    name: str
    thread_id: int
    started: float
    soft_deadline: float | None
    hard_deadline: float | None
    args: tuple[Any, ...] = ()
    request: Any = None  # celery.worker.request.Request when known: its .message holds the SQS receipt
    soft_sent: bool = False
    hard_hit: bool = False
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def job(self) -> dict[str, Any] | None:
        """samseg's stage tasks take the job dict as their first argument."""
        first = self.args[0] if self.args else None
        return first if isinstance(first, dict) else None


def task_limits(task: Any) -> tuple[float | None, float | None]:
    """(soft, hard) seconds as Celery's prefork pool would apply them: message header, else the task's own."""
    hard, soft = None, None
    header = getattr(getattr(task, "request", None), "timelimit", None)
    if isinstance(header, list | tuple) and len(header) == 2:
        hard, soft = header
    hard = hard or getattr(task, "time_limit", None)
    soft = soft or getattr(task, "soft_time_limit", None)
    return (float(soft) if soft else None, float(hard) if hard else None)


def raise_in_thread(thread_id: int, exc_type: type[BaseException] | None) -> bool:
    """Schedule `exc_type` to be raised in another thread at its next Python bytecode (None: cancel)."""
    exc = ctypes.py_object(exc_type) if exc_type is not None else None
    hit = ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread_id), exc)
    if hit > 1:  # "if it returns a number greater than one, you're in trouble" (CPython docs): undo
        ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread_id), None)
        return False
    return bool(hit)


class StageWatchdog(threading.Thread):
    """Watches the tasks running in this process; see the module docstring for what it does at each limit."""

    def __init__(
        self,
        on_hard_timeout: Callable[[RunningTask], None] | None = None,
        *,
        interval: float = 0.5,
        hook_timeout: float = 30.0,
        exit_process: Callable[[int], Any] = os._exit,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__(name="samseg-watchdog", daemon=True)
        self.on_hard_timeout = on_hard_timeout
        self.interval = interval
        self.hook_timeout = hook_timeout
        self.exit_process = exit_process
        self.clock = clock
        self._lock = threading.Lock()
        self._tasks: dict[str, RunningTask] = {}
        self._stopping = threading.Event()
        self._exiting = False

    # --- called from the task's own thread (task_prerun / task_postrun) -----------------------------------
    def task_started(
        self,
        task_id: str,
        name: str,
        soft: float | None,
        hard: float | None,
        args: tuple[Any, ...] = (),
        request: Any = None,
    ) -> None:
        now = self.clock()
        if soft is not None and hard is not None and soft >= hard:
            soft = None  # a soft limit at or after the hard one can never help
        running = RunningTask(
            task_id=task_id,
            name=name,
            thread_id=threading.get_ident(),
            started=now,
            soft_deadline=now + soft if soft else None,
            hard_deadline=now + hard if hard else None,
            args=tuple(args),
            request=request,
        )
        with self._lock:
            self._tasks[task_id] = running

    def task_finished(self, task_id: str) -> None:
        with self._lock:
            running = self._tasks.pop(task_id, None)
        if running is None:
            return
        with running._lock:
            if running.soft_sent and running.thread_id == threading.get_ident():
                # Sent but perhaps not yet raised (the task ended first): cancel it so that it cannot land in
                # Celery's own code or in the next task this thread runs.
                raise_in_thread(running.thread_id, None)

    # --- the watchdog thread ----------------------------------------------------------------------------
    def running(self) -> list[RunningTask]:
        with self._lock:
            return list(self._tasks.values())

    def problems(self) -> list[str]:
        """Why this worker is unhealthy (a task past its hard deadline), for the heartbeat; empty if fine."""
        return [
            f"task {t.name}[{t.task_id}] is past its hard time limit and stuck outside Python"
            for t in self.running()
            if t.hard_hit
        ]

    def check(self) -> RunningTask | None:
        """One round: send due soft limits; return the first task past its hard deadline (marked), if any."""
        now = self.clock()
        overdue = None
        for task in self.running():
            with task._lock:
                if task.soft_deadline is not None and now >= task.soft_deadline and not task.soft_sent:
                    with self._lock:
                        still_running = task.task_id in self._tasks
                    if still_running:
                        from celery.exceptions import SoftTimeLimitExceeded

                        task.soft_sent = raise_in_thread(task.thread_id, SoftTimeLimitExceeded)
                        log.warning(
                            "task_soft_time_limit",
                            task=task.name,
                            task_id=task.task_id,
                            job_uuid=(task.job or {}).get("uuid"),
                            seconds=round(now - task.started, 1),
                            delivered_to_thread=task.soft_sent,
                        )
                if task.hard_deadline is not None and now >= task.hard_deadline and not task.hard_hit:
                    task.hard_hit = True
                    overdue = overdue or task
        return overdue

    def run(self) -> None:
        while not self._stopping.wait(self.interval):
            try:
                overdue = self.check()
            except Exception as exc:  # the watchdog must outlive any bug in one round
                log.error("watchdog_check_failed", error=repr(exc))
                continue
            if overdue is not None:
                self.hard_timeout(overdue)
                return

    def hard_timeout(self, task: RunningTask) -> None:
        """Run the hook (bounded by hook_timeout), then end the process: the stuck thread cannot be freed."""
        self._exiting = True
        log.error(
            "task_hard_time_limit",
            task=task.name,
            task_id=task.task_id,
            job_uuid=(task.job or {}).get("uuid"),
            seconds=round(self.clock() - task.started, 1),
            sqs_message_known=held_message(task.request) is not None,
            consequence=f"the worker process exits with status {EXIT_HARD_TIMEOUT} to be restarted",
        )
        if self.on_hard_timeout is not None:
            hook = threading.Thread(target=self._run_hook, args=(task,), name="samseg-hard-timeout", daemon=True)
            hook.start()
            hook.join(self.hook_timeout)
            if hook.is_alive():
                log.error("hard_timeout_hook_timed_out", task_id=task.task_id, seconds=self.hook_timeout)
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        self.exit_process(EXIT_HARD_TIMEOUT)

    def _run_hook(self, task: RunningTask) -> None:
        assert self.on_hard_timeout is not None
        try:
            self.on_hard_timeout(task)
        except Exception as exc:
            log.error("hard_timeout_hook_failed", task_id=task.task_id, error=repr(exc))

    @property
    def exiting(self) -> bool:
        return self._exiting

    def stop(self) -> None:
        self._stopping.set()


def held_message(request: Any) -> tuple[str, str] | None:
    """(queue URL, receipt handle) of the SQS message behind a worker request, for acknowledging it by hand.

    kombu's SQS transport keeps them on the kombu message: `delivery_info["sqs_queue"]` and `delivery_tag`.
    A hard-timeout hook acknowledges through its own boto3 client (thread-safe), not through kombu.
    """
    message = getattr(request, "message", None)
    queue_url = (getattr(message, "delivery_info", None) or {}).get("sqs_queue")
    receipt = getattr(message, "delivery_tag", None)
    if not queue_url or not receipt:
        return None
    return str(queue_url), str(receipt)


def watches_pool(pool_cls: Any) -> bool:
    """True for the pools Celery enforces no time limit in (solo, threads, and pools built on them such as
    samseg.worker.pool.ModelThreadPool, the GPU worker's); prefork enforces its own."""
    from celery.concurrency.solo import TaskPool as SoloPool
    from celery.concurrency.thread import TaskPool as ThreadPool

    if isinstance(pool_cls, type):
        return issubclass(pool_cls, SoloPool | ThreadPool)
    return str(pool_cls) in {"solo", "threads"}


def release_held_messages(client: Any, requests: list[Any]) -> int:
    """Make every message this worker still holds visible again at once (visibility 0); returns how many.

    Run last at a hard timeout, just before the process ends: otherwise the messages it reserved (prefetched,
    or tasks of other threads) would stay hidden until their visibility timeout — up to an hour — after the
    exit. A message the hooks already acknowledged is gone, and skipped. The stuck task's own message, if no
    hook acknowledged it, comes back too: its job is tried again, and if it hangs every time, the queue's
    redrive policy moves it to the dead-letter queue after SAMSEG_TASK_MAX_RECEIVE_COUNT receives.
    """
    released = 0
    for request in requests:
        held = held_message(request)
        if held is None or getattr(getattr(request, "message", None), "acknowledged", False):
            continue
        try:
            client.change_message_visibility(QueueUrl=held[0], ReceiptHandle=held[1], VisibilityTimeout=0)
            released += 1
        except Exception as exc:  # acknowledged meanwhile, or SQS unreachable: it comes back after its timeout
            log.warning("release_message_failed", error=repr(exc))
    return released


def worker_hard_timeout(
    settings: Settings, threads: list[Any], hooks: list[Callable[[RunningTask], None]]
) -> Callable[[RunningTask], None]:
    """The `on_hard_timeout` of a solo/threads worker (samseg.worker.services): in this order, before the exit,

    report unhealthy at once (one heartbeat now), stop the visibility keeper, run `hooks` (in order; the job's
    side of it: mark it failed (`timeout`), queue its `failed` callback, acknowledge its message — see
    samseg.worker.failure.hung_task_hook), then release every message the worker still holds
    (`release_held_messages`). `threads` is the worker's list of helper threads (heartbeat, visibility keeper).
    """
    from samseg.ops.health import Heartbeat
    from samseg.queue.sqs import probe_client
    from samseg.queue.visibility import VisibilityKeeper, snapshot

    client = probe_client(settings)  # made now: at the timeout there may be no time to build one

    def hard_timeout(task: RunningTask) -> None:
        from celery.worker import state

        for thread in list(threads):
            if isinstance(thread, Heartbeat):
                thread.beat()
            if isinstance(thread, VisibilityKeeper):
                thread.stop()
        for hook in hooks:
            try:
                hook(task)
            except Exception as exc:
                log.error("hard_timeout_hook_failed", hook=getattr(hook, "__name__", repr(hook)), error=repr(exc))
        released = release_held_messages(client, snapshot(state.reserved_requests))
        log.info("held_messages_released", count=released)

    return hard_timeout
