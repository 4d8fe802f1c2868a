"""The Celery application: configuration from celeryconfig.py, the ingress step, logging and hooks."""

from __future__ import annotations

from typing import Any

import structlog
from celery import Celery, signals

from samseg.logs import bind_job, configure_logging, unbind_job
from samseg.settings import get_settings

log = structlog.get_logger(__name__)

app = Celery("samseg", include=["samseg.pipeline"])
app.config_from_object("celeryconfig")


@signals.setup_logging.connect
def _setup_logging(**_: Any) -> None:
    """Replace Celery's log set-up with ours, so worker and beat write the same structured lines."""
    settings = get_settings()
    configure_logging(settings.log_level, settings.log_json)


@signals.task_prerun.connect
def _bind_task(task: Any = None, args: Any = None, **_: Any) -> None:
    job = args[0] if args and isinstance(args[0], dict) else {}
    bind_job(job.get("uuid"), getattr(task, "name", None))


@signals.task_postrun.connect
def _unbind_task(**_: Any) -> None:
    unbind_job()


_keeper: Any = None


@signals.worker_ready.connect
def _worker_ready(sender: Any = None, **_: Any) -> None:
    global _keeper
    from samseg.visibility import VisibilityKeeper

    settings = get_settings()
    _keeper = VisibilityKeeper(settings)
    _keeper.start()
    log.info(
        "worker_ready",
        jobs_queue=settings.jobs_queue,
        queues=sorted(app.amqp.queues.consume_from),
        model=settings.sam2_model,
        device=settings.device,
    )


@signals.worker_init.connect
def _worker_init(**_: Any) -> None:
    """Create the jobs queue, its DLQ and redrive policy before consuming (idempotent)."""
    from samseg.sqs import JobQueues
    from samseg.storage import AssetStore
    from samseg.visibility import check_visibility

    settings = get_settings()
    AssetStore(settings.assets_dir).ensure_layout()
    try:
        JobQueues(settings).ensure()
    except Exception as exc:  # SQS unreachable: kombu's connection retry takes over from here
        log.warning("queues_not_ensured", error=repr(exc))
    for problem in check_visibility(settings):
        log.warning("visibility_timeout_too_short", problem=problem, consequence="long tasks may run twice")


@signals.worker_shutdown.connect
def _worker_shutdown(**_: Any) -> None:
    if _keeper is not None:
        _keeper.stop()


from samseg.ingress import IngressStep  # noqa: E402  (needs `app` above)

app.steps["consumer"].add(IngressStep)
