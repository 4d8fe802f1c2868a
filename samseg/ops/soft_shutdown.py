"""A bounded stop for workers whose tasks run in threads (the GPU worker): SIGTERM → finish or hand back.

`SAMSEG_WORKER_SOFT_SHUTDOWN_TIMEOUT_SECONDS` is how long a stopping worker lets its running tasks go on. Then
their messages go back to SQS at once (visibility 0) for another worker, instead of waiting out the platform's
SIGKILL and the visibility timeout. Two mechanisms, by pool:

- **prefork** (the io worker): Celery's own soft shutdown (Celery >= 5.5, `worker_soft_shutdown_timeout`, set
  from the same setting in samseg.worker.config) with `REMAP_SIGTERM=SIGQUIT` in the container's environment:
  SIGTERM starts a cold shutdown that first waits the timeout, then terminates the pool children still running;
  their unacknowledged messages are restored when the worker closes its SQS channel.
- **solo / threads / samseg.pool:ModelThreadPool** (the GPU worker): Celery cancels a running task with
  `pool.terminate_job`, which these pools do not have (a thread cannot be killed) — with `REMAP_SIGTERM=SIGQUIT`
  the GPU worker got stuck in its shutdown here ("terminate called without an active exception", still alive
  30 s later). So the GPU worker keeps Celery's *warm* shutdown on SIGTERM (no REMAP_SIGTERM), and this module
  bounds it: on `worker_shutting_down` a thread waits until no task is running or the timeout passed; in the
  second case (and never before the last SQS long poll has ended: wait_time_seconds + 1 = 11 s) it gives up
  the running stages' leases in the job store (so the next worker takes their runs over at once, not after
  SAMSEG_STAGE_LEASE_SECONDS), releases every message the worker still holds
  (samseg.ops.watchdog.release_held_messages) and ends the process. A task that finishes in time ends
  normally (acknowledged, its callback sent).

Exactly once either way: a task whose message went back never acknowledges or publishes its next stage (the
process ends first), and the redelivered message runs the stage again under the same run (the job store's
records are conditional), so the job ends with one callback.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import structlog

from samseg.core.settings import Settings

log = structlog.get_logger(__name__)

EXIT_SOFT_SHUTDOWN = 0  # a stop the platform asked for: not a failure


class ShutdownDeadline:
    """Started once by `worker_shutting_down`; ends the process if tasks still run after `timeout` seconds."""

    def __init__(
        self,
        timeout: float,
        running: Callable[[], int],
        release: Callable[[], int],
        exit_process: Callable[[int], None] = os._exit,
        poll: float = 0.1,
        long_poll_seconds: float = 0.0,
    ) -> None:
        # A long poll (ReceiveMessage, up to `long_poll_seconds`) sent before the shutdown began can still take a
        # message that is made visible again: SQS delivers it to this dying process, hidden for the whole
        # visibility timeout (seen with moto). So nothing is released before that poll has surely ended.
        self.timeout = max(timeout, long_poll_seconds + 1.0 if long_poll_seconds else 0.0)
        self.running = running
        self.release = release
        self.exit_process = exit_process
        self.poll = poll
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def start(self, **_: Any) -> None:
        """The signal receiver: runs inside Celery's signal handler, so it only starts a thread."""
        with self._lock:
            if self._thread is not None:
                return
            self._thread = threading.Thread(target=self._run, name="samseg-soft-shutdown", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            if not self.running():
                return  # Celery's warm shutdown finishes the rest
            time.sleep(self.poll)
        count = self.running()
        if not count:
            return
        released = self.release()
        log.warning(
            "soft_shutdown_timeout",
            seconds=self.timeout,
            running_tasks=count,
            messages_released=released,
            consequence="the running tasks are redone by another worker; this process exits now",
        )
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        self.exit_process(EXIT_SOFT_SHUTDOWN)


_deadline: ShutdownDeadline | None = None


def install(
    settings: Settings,
    pool_cls: Any,
    threads: list[Any] | None = None,
    release_leases: Callable[[], int] | None = None,
) -> ShutdownDeadline | None:
    """Bound the warm shutdown of a solo/threads worker by SAMSEG_WORKER_SOFT_SHUTDOWN_TIMEOUT_SECONDS.

    Called from the worker's `worker_ready` handler. `release_leases` gives up the running stages' leases
    (samseg.worker.leases.release_held_leases; the worker layer passes it in); it runs before the messages go
    back, so the worker that receives one finds its run free. Prefork workers get Celery's own soft shutdown instead
    (samseg.worker.config sets worker_soft_shutdown_timeout); nothing is installed for them.
    """
    global _deadline
    from samseg.ops.watchdog import watches_pool

    timeout = settings.worker_soft_shutdown_timeout_seconds
    if timeout <= 0 or not watches_pool(pool_cls) or _deadline is not None:
        return _deadline
    from celery import signals
    from celery.apps import worker as celery_worker

    if getattr(celery_worker, "REMAP_SIGTERM", None) == "SIGQUIT":
        log.error(
            "soft_shutdown_remap_sigterm",
            problem="REMAP_SIGTERM=SIGQUIT makes Celery cancel running tasks through the pool, which thread "
            "pools cannot do; unset it for this worker (samseg bounds the warm shutdown itself)",
        )
    from samseg.ops.watchdog import release_held_messages
    from samseg.queue.sqs import probe_client
    from samseg.queue.visibility import VisibilityKeeper, snapshot

    client = probe_client(settings)  # made now: at the deadline there may be no time to build one

    def running() -> int:
        from celery.worker import state

        return len(snapshot(state.active_requests))

    def release() -> int:
        from celery.worker import state

        for thread in list(threads or ()):
            if isinstance(thread, VisibilityKeeper):
                thread.stop()  # it would otherwise extend what is being handed back
        if release_leases is not None:
            try:
                log.info("soft_shutdown_leases_released", leases=release_leases())
            except Exception as exc:  # best effort: the leases run out by themselves
                log.warning("soft_shutdown_lease_release_failed", error=repr(exc)[:300])
        return release_held_messages(client, snapshot(state.reserved_requests))

    from celery import current_app

    long_poll = float((current_app.conf.broker_transport_options or {}).get("wait_time_seconds", 20))
    _deadline = ShutdownDeadline(timeout, running, release, long_poll_seconds=long_poll)
    signals.worker_shutting_down.connect(_deadline.start, weak=False)
    log.info("soft_shutdown_installed", seconds=_deadline.timeout)
    return _deadline
