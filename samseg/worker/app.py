"""The Celery application: `create_app(settings)` builds it; `celery -A samseg` finds it as `samseg.app`.

The app is configured from Settings (samseg.worker.config), uses samseg's SQS transport (samseg.queue.transport),
consumes the app server's raw jobs queue (samseg.worker.ingress), and registers the task modules by name.
Everything a worker owns for its lifetime — heartbeat, visibility keeper, watchdog, metrics server — lives in
one `WorkerServices` object built with the app and driven by Celery's signals; nothing is kept in module globals.
"""

from __future__ import annotations

from typing import Any

from celery import Celery, signals

from samseg.core.logs import configure_logging
from samseg.core.settings import Settings, get_settings
from samseg.queue.transport import TRANSPORT
from samseg.worker.config import celery_config
from samseg.worker.ingress import IngressStep
from samseg.worker.services import WorkerServices

# The task modules, imported by Celery when the app is finalised (by name: nothing here imports them).
TASK_MODULES = ("samseg.worker.stages", "samseg.worker.failure", "samseg.worker.outbox", "samseg.worker.beat_tasks")


class SamsegCelery(Celery):  # type: ignore[misc]
    """A Celery app that owns its worker's services (`services`)."""

    services: WorkerServices


def create_app(settings: Settings | None = None) -> SamsegCelery:
    """Build the Celery app from `settings` (default: the environment and `.env`)."""
    settings = settings or get_settings()
    app = SamsegCelery("samseg", include=list(TASK_MODULES), set_as_current=True)
    app.conf.update(celery_config(settings))
    app.conf.broker_transport = TRANSPORT
    app.conf.broker_transport_options = {
        **app.conf.broker_transport_options,
        # samseg.queue.transport.Channel: the app server's queue is read raw; prompt polling on or off.
        "samseg_raw_queues": [settings.jobs_queue],
        "samseg_prompt_polling": settings.sqs_prompt_polling,
    }
    if settings.events:
        from samseg.queue.events import enable_sqs_events

        enable_sqs_events(app, settings)
    app.steps["consumer"].add(IngressStep)
    app.services = WorkerServices(app, settings)
    app.services.connect()
    _connect_process_signals(settings)
    return app


def _connect_process_signals(settings: Settings) -> None:
    """Handlers that concern the process, not one app: logging (beat's state folder: samseg.worker.beat_schedule)."""

    def setup_logging(**_: Any) -> None:
        """Replace Celery's log set-up with ours, so worker and beat write the same structured lines."""
        configure_logging(settings.log_level, settings.log_json)

    signals.setup_logging.connect(setup_logging, weak=False, dispatch_uid="samseg.setup_logging")


_app: SamsegCelery | None = None


def get_app() -> SamsegCelery:
    """The process's app, built on first use (`samseg.app` and the CLI call this)."""
    global _app
    if _app is None:
        _app = create_app()
    return _app
