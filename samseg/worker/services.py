"""What a worker process owns for its lifetime, in one object: `WorkerServices`.

Built with the app (samseg.worker.app.create_app) and driven by Celery's worker signals, in order:
`worker_init` (stores, queues, weights checked; health reset; metrics directory claimed before any fork),
`worker_process_init` (the model warmed in the process that will use it), `worker_ready` (heartbeat,
visibility keeper, watchdog in solo/threads pools, the /metrics server), `task_prerun`/`task_postrun` (log
context, stage timings, the watchdog's deadlines), `worker_shutdown` (every thread stopped).
"""

from __future__ import annotations

import os
import socket
import threading
import time
from typing import TYPE_CHECKING, Any

import structlog
from celery import signals

from samseg.core.logs import bind_job, configure_logging, unbind_job
from samseg.core.settings import Settings

if TYPE_CHECKING:
    from celery import Celery

    from samseg.ops.metrics import MetricsServer
    from samseg.ops.watchdog import StageWatchdog
    from samseg.stores import Stores

log = structlog.get_logger(__name__)


class WorkerServices:
    """The worker's helper threads and per-task bookkeeping (see the module docstring)."""

    def __init__(self, app: Celery, settings: Settings) -> None:
        self.app = app
        self.settings = settings
        self.threads: list[Any] = []
        self.watchdog: StageWatchdog | None = None  # solo/threads workers only (their tasks run in this process)
        self.metrics_server: MetricsServer | None = None
        self._started: dict[str, float] = {}

    def connect(self) -> None:
        """Connect the handlers (strongly: they are bound methods of this object, which the app keeps)."""
        for signal, handler in (
            (signals.worker_init, self.on_worker_init),
            (signals.worker_process_init, self.on_process_init),
            (signals.worker_process_shutdown, self.on_process_shutdown),
            (signals.worker_ready, self.on_worker_ready),
            (signals.worker_shutdown, self.on_worker_shutdown),
            (signals.task_prerun, self.on_task_prerun),
            (signals.task_postrun, self.on_task_postrun),
        ):
            signal.connect(handler, weak=False)

    # --- start and stop --------------------------------------------------------------------------------------
    def on_worker_init(self, **_: Any) -> None:
        """Create the jobs queue, its DLQ and redrive policy, check the stores and weights before consuming."""
        from samseg.ops import metrics
        from samseg.ops.health import reset as reset_health
        from samseg.ops.scratch import sweep_scratch
        from samseg.queue.sqs import JobQueues
        from samseg.queue.visibility import check_visibility
        from samseg.stores import build_stores

        settings = self.settings
        configure_logging(settings.log_level, settings.log_json)  # worker_init comes before setup_logging
        metrics.setup(settings)  # before the pool forks: children inherit the tree's directory
        reset_health(settings.worker_heartbeat_file)
        settings.state_dir.mkdir(parents=True, exist_ok=True)
        sweep_scratch(settings)  # temporary folders a killed worker left behind (before this one makes any)
        ensure_stores(settings, build_stores(settings))
        try:
            JobQueues(settings).ensure()
        except Exception as exc:  # SQS unreachable: kombu's connection retry takes over from here
            log.warning("queues_not_ensured", error=repr(exc))
        _check_callback_transport(settings)
        if self.consumes_gpu_queue():
            _ensure_weights(settings)  # a segmenting worker has its checkpoint before it consumes, preload or not
        for problem in check_visibility(settings):
            log.warning("visibility_timeout_too_short", problem=problem, consequence="long tasks may run twice")

    def on_worker_ready(self, sender: Any = None, **_: Any) -> None:
        from samseg.ops import metrics, scale_in, scaling_signal, soft_shutdown
        from samseg.ops.health import Heartbeat
        from samseg.ops.watchdog import StageWatchdog, watches_pool, worker_hard_timeout
        from samseg.queue.visibility import VisibilityKeeper
        from samseg.worker.failure import hung_task_hook
        from samseg.worker.leases import release_held_leases

        settings = self.settings
        hostname = getattr(sender, "hostname", None) or socket.gethostname()
        pool_cls = getattr(getattr(sender, "controller", None), "pool_cls", None)
        if watches_pool(pool_cls):
            # Celery enforces no time limits in solo/threads pools (celery#8395): samseg's watchdog does.
            hooks = [hung_task_hook(self.app, settings)]
            self.watchdog = StageWatchdog(worker_hard_timeout(settings, self.threads, hooks))
            self.threads.append(self.watchdog)
        heartbeat = Heartbeat(
            settings.worker_heartbeat_file,
            settings.worker_heartbeat_interval_seconds,
            hostname,
            self.needs_model(),
            problems=self.watchdog.problems if self.watchdog is not None else None,
        )
        self.threads.extend([VisibilityKeeper(settings), heartbeat])
        for thread in self.threads:
            thread.start()
        # Scale-in protection (off by default) and the bounded stop of thread pools; prefork: Celery's soft shutdown.
        scale_in.install(settings, pool_cls)
        scaling_signal.install()  # samseg_queue_wait_seconds on this worker's /metrics
        soft_shutdown.install(settings, pool_cls, self.threads, release_leases=release_held_leases)
        if settings.metrics_port:
            self.metrics_server = metrics.serve(settings.metrics_port, settings.metrics_host)
        log.info(
            "worker_ready",
            jobs_queue=settings.jobs_queue,
            queues=sorted(self.app.amqp.queues.consume_from),
            model=settings.sam2_model,
            device=settings.device,
            events=settings.events,
            time_limits_by="samseg.ops.watchdog" if self.watchdog is not None else "celery",
        )

    def on_worker_shutdown(self, **_: Any) -> None:
        from samseg.ops import scale_in

        for thread in self.threads:
            thread.stop()
        scale_in.uninstall()
        if self.metrics_server is not None:
            self.metrics_server.stop()

    # --- pool processes ---------------------------------------------------------------------------------------
    def consumes_gpu_queue(self) -> bool:
        return self.settings.gpu_queue in self.app.amqp.queues.consume_from

    def needs_model(self) -> bool:
        """Load and warm the model at start (SAMSEG_PRELOAD_MODEL) in a worker that segments."""
        return self.settings.preload_model and self.consumes_gpu_queue()

    def on_process_init(self, **_: Any) -> None:
        """Load and warm the model in the process that will use it, off the init path (it has a 4 s budget)."""
        if not self.needs_model():
            return
        settings = self.settings

        def warm() -> None:
            from samseg.ops.health import mark_ready
            from samseg.runtime.segmenter import get_segmenter

            try:
                seconds = get_segmenter(settings).warm_up()
            except Exception as exc:
                log.error("model_warm_up_failed", error=repr(exc))
                return
            mark_ready(settings.worker_heartbeat_file, warm_up_seconds=round(seconds, 2))
            log.info("model_ready", warm_up_seconds=round(seconds, 2), model=settings.sam2_model)

        threading.Thread(target=warm, name="samseg-warm-up", daemon=True).start()

    def on_process_shutdown(self, pid: int | None = None, **_: Any) -> None:
        from samseg.ops import metrics

        metrics.process_exited(pid or os.getpid())

    # --- each task ------------------------------------------------------------------------------------------
    def on_task_prerun(self, task_id: str | None = None, task: Any = None, args: Any = None, **_: Any) -> None:
        first = args[0] if args else None
        uuid = first.get("uuid") if isinstance(first, dict) else first if isinstance(first, str) else None
        bind_job(uuid, getattr(task, "name", None))
        if task_id:
            self._started[task_id] = time.monotonic()
        if self.watchdog is not None and task_id:
            from samseg.ops.watchdog import task_limits

            soft, hard = task_limits(task)
            self.watchdog.task_started(task_id, str(task.name), soft, hard, tuple(args or ()), _active_request(task_id))

    def on_task_postrun(self, task_id: str | None = None, task: Any = None, **_: Any) -> None:
        from samseg.ops import metrics

        if self.watchdog is not None and task_id:
            self.watchdog.task_finished(task_id)
        started = self._started.pop(task_id or "", None)
        stage = str(getattr(task, "name", "")).removeprefix("samseg.")
        if started is not None and stage in metrics.STAGES:
            metrics.instruments().stage_seconds.labels(stage).observe(time.monotonic() - started)
        unbind_job()


def _active_request(task_id: str) -> Any:
    from celery.worker import state

    from samseg.queue.visibility import snapshot  # the set changes under us in a threads pool

    return next((r for r in snapshot(state.active_requests) if getattr(r, "id", None) == task_id), None)


def ensure_stores(settings: Settings, stores: Stores) -> None:
    """Create the job table if missing and check the blob store; a worker that cannot reach either says why.

    Neither stops the worker: an unreachable store at start is like SQS being down (each stage fails with
    `storage_error` or retries), and refusing to start would turn a blip into a crash loop.
    """
    try:
        stores.jobs.ensure()
        log.info("job_store_ready", store=stores.jobs.backend.describe())
    except Exception as exc:
        log.error("job_store_unavailable", error=repr(exc), url=settings.job_store_url)
    try:
        log.info("blob_store_ready", store=stores.blobs.check())
    except Exception as exc:
        log.error("blob_store_unavailable", error=repr(exc), url=settings.storage_url or str(settings.assets_dir))


def _check_callback_transport(settings: Settings) -> None:
    """Warn about callbacks that go nowhere or in clear text; refuse to start if https is required."""
    from samseg.transfer.callbacks import InsecureCallbackError, check_callback_transport

    try:
        for problem in check_callback_transport(settings):
            log.warning("callback_transport", problem=problem)
    except InsecureCallbackError as exc:
        log.error("callback_transport_refused", error=str(exc), consequence="the worker does not start")
        raise SystemExit(1) from exc


def _ensure_weights(settings: Settings) -> None:
    """A worker that will segment has its checkpoint before it consumes (downloaded once per host, locked)."""
    from samseg.runtime.weights import WeightsError, ensure_configured

    try:
        path = ensure_configured(settings)
    except WeightsError as exc:
        log.error("weights_unavailable", error=str(exc), consequence="the worker does not start")
        raise SystemExit(1) from exc
    log.info("weights_present", checkpoint=str(path), model=settings.sam2_model)
