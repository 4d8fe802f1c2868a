"""The Celery application: configuration from celeryconfig.py, the ingress step, logging and hooks."""

from __future__ import annotations

import os
import socket
import threading
import time
from typing import TYPE_CHECKING, Any

import structlog
from celery import Celery, signals

from samseg.core.logs import bind_job, configure_logging, unbind_job
from samseg.core.settings import Settings, get_settings
from samseg.queue import transport as sqs_transport_fix

if TYPE_CHECKING:
    from samseg.stores import Stores

log = structlog.get_logger(__name__)

sqs_transport_fix.apply(raw_queues=frozenset({get_settings().jobs_queue}))

app = Celery("samseg", include=["samseg.worker.stages"])
app.config_from_object("samseg.worker.config")
if get_settings().events:
    from samseg.queue.events import enable_sqs_events

    enable_sqs_events(app, get_settings())


@signals.setup_logging.connect
def _setup_logging(**_: Any) -> None:
    """Replace Celery's log set-up with ours, so worker and beat write the same structured lines."""
    settings = get_settings()
    configure_logging(settings.log_level, settings.log_json)


_started: dict[str, float] = {}
_watchdog: Any = None  # samseg.ops.watchdog.StageWatchdog in solo/threads workers (their tasks run in this process)


@signals.task_prerun.connect
def _bind_task(task_id: str | None = None, task: Any = None, args: Any = None, **_: Any) -> None:
    job = args[0] if args and isinstance(args[0], dict) else {}
    bind_job(job.get("uuid"), getattr(task, "name", None))
    if task_id:
        _started[task_id] = time.monotonic()
    if _watchdog is not None and task_id:
        from samseg.ops.watchdog import task_limits

        soft, hard = task_limits(task)
        _watchdog.task_started(task_id, str(task.name), soft, hard, tuple(args or ()), _active_request(task_id))


def _active_request(task_id: str) -> Any:
    from celery.worker import state

    from samseg.queue.visibility import _snapshot  # the set changes under us in a threads pool

    return next((r for r in _snapshot(state.active_requests) if getattr(r, "id", None) == task_id), None)


@signals.task_postrun.connect
def _unbind_task(task_id: str | None = None, task: Any = None, **_: Any) -> None:
    if _watchdog is not None and task_id:
        _watchdog.task_finished(task_id)
    started = _started.pop(task_id or "", None)
    stage = str(getattr(task, "name", "")).removeprefix("samseg.")
    if started is not None:
        from samseg.ops import metrics

        if stage in metrics.STAGES:
            metrics.STAGE_SECONDS.labels(stage).observe(time.monotonic() - started)
    unbind_job()


def _needs_model() -> bool:
    settings = get_settings()
    return settings.preload_model and settings.gpu_queue in app.amqp.queues.consume_from


@signals.worker_process_init.connect
def _warm_up_model(**_: Any) -> None:
    """Load and warm the model in the process that will use it, off the init path (it has a 4 s budget)."""
    if not _needs_model():
        return

    def warm() -> None:
        from samseg.ops.health import mark_ready
        from samseg.runtime.segmenter import get_segmenter

        settings = get_settings()
        try:
            seconds = get_segmenter(settings).warm_up()
        except Exception as exc:
            log.error("model_warm_up_failed", error=repr(exc))
            return
        mark_ready(settings.worker_heartbeat_file, warm_up_seconds=round(seconds, 2))
        log.info("model_ready", warm_up_seconds=round(seconds, 2), model=settings.sam2_model)

    threading.Thread(target=warm, name="samseg-warm-up", daemon=True).start()


@signals.worker_process_shutdown.connect
def _process_shutdown(pid: int | None = None, **_: Any) -> None:
    from samseg.ops import metrics

    metrics.process_exited(pid or os.getpid())


_threads: list[Any] = []
_metrics_server: Any = None  # the worker's own /metrics (samseg.ops.metrics.MetricsServer), main process only


@signals.worker_ready.connect
def _worker_ready(sender: Any = None, **_: Any) -> None:
    from samseg.ops.health import Heartbeat
    from samseg.ops.watchdog import StageWatchdog, watches_pool, worker_hard_timeout
    from samseg.queue.visibility import VisibilityKeeper

    settings = get_settings()
    hostname = getattr(sender, "hostname", None) or socket.gethostname()
    global _watchdog
    pool_cls = getattr(getattr(sender, "controller", None), "pool_cls", None)
    if watches_pool(pool_cls):
        # Celery enforces no time limits in solo/threads pools (celery#8395): samseg's watchdog does.
        _watchdog = StageWatchdog(worker_hard_timeout(settings, _threads))
        _threads.append(_watchdog)
    heartbeat = Heartbeat(
        settings.worker_heartbeat_file,
        settings.worker_heartbeat_interval_seconds,
        hostname,
        _needs_model(),
        problems=_watchdog.problems if _watchdog is not None else None,
    )
    _threads.extend([VisibilityKeeper(settings), heartbeat])
    for thread in _threads:
        thread.start()
    # --- scale-in protection and bounded stop (prod-k8s): samseg/ops/scale_in.py, soft_shutdown.py; off by default
    from samseg.ops import scale_in, scaling_signal, soft_shutdown

    scale_in.install(settings, pool_cls)
    scaling_signal.install()  # samseg_queue_wait_seconds on this worker's /metrics
    soft_shutdown.install(settings, pool_cls, _threads)  # solo/threads pools; prefork: Celery's soft shutdown
    # --- end scale-in protection
    if settings.metrics_port:
        from samseg.ops import metrics

        global _metrics_server
        _metrics_server = metrics.serve(settings.metrics_port, settings.metrics_host)
    log.info(
        "worker_ready",
        jobs_queue=settings.jobs_queue,
        queues=sorted(app.amqp.queues.consume_from),
        model=settings.sam2_model,
        device=settings.device,
        events=settings.events,
        time_limits_by="samseg.ops.watchdog" if _watchdog is not None else "celery",
    )


@signals.worker_init.connect
def _worker_init(**_: Any) -> None:
    """Create the jobs queue, its DLQ and redrive policy before consuming (idempotent)."""
    from samseg.ops.health import reset as reset_health
    from samseg.queue.sqs import JobQueues
    from samseg.queue.visibility import check_visibility
    from samseg.stores import build_stores

    settings = get_settings()
    configure_logging(settings.log_level, settings.log_json)  # worker_init comes before setup_logging
    reset_health(settings.worker_heartbeat_file)
    settings.state_dir.mkdir(parents=True, exist_ok=True)
    ensure_stores(settings, build_stores(settings))
    try:
        JobQueues(settings).ensure()
    except Exception as exc:  # SQS unreachable: kombu's connection retry takes over from here
        log.warning("queues_not_ensured", error=repr(exc))
    _check_callback_transport(settings)
    if settings.gpu_queue in app.amqp.queues.consume_from:
        _ensure_weights(settings)
    for problem in check_visibility(settings):
        log.warning("visibility_timeout_too_short", problem=problem, consequence="long tasks may run twice")


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


@signals.worker_shutdown.connect
def _worker_shutdown(**_: Any) -> None:
    for thread in _threads:
        thread.stop()
    from samseg.ops import scale_in  # prod-k8s: clear this worker's scale-in protection

    scale_in.uninstall()
    if _metrics_server is not None:
        _metrics_server.stop()


from samseg.worker.ingress import IngressStep  # noqa: E402  (needs `app` above)

app.steps["consumer"].add(IngressStep)
