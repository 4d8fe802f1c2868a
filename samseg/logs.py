"""structlog set-up shared by the worker, beat, the API and the CLI.

JSON lines when stderr is not a terminal (containers, log shippers), coloured key=value on a terminal.
Celery's and uvicorn's stdlib loggers go through the same renderer, so every line has one shape, and the
job uuid and task name bound in contextvars (see `bind_job`) appear on every line written during a task.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import MutableMapping
from typing import Any

import structlog


def configure_logging(level: str = "INFO", json: bool | None = None) -> None:
    render_json = (not sys.stderr.isatty()) if json is None else json
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.StackInfoRenderer(),
    ]
    renderer: Any = structlog.processors.JSONRenderer() if render_json else structlog.dev.ConsoleRenderer(colors=True)
    structlog.configure(
        processors=[*shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[*shared, _celery_task_fields],
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            structlog.processors.format_exc_info if render_json else _identity,
            renderer,
        ],
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for noisy in ("botocore", "boto3", "urllib3", "httpx", "httpcore", "hydra"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access", "celery", "kombu"):
        logging.getLogger(name).handlers[:] = []
        logging.getLogger(name).propagate = True


def _celery_task_fields(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """Celery's own "Task x[id] received/succeeded" lines carry name and id in `extra["data"]`: lift them out.

    samseg's task ids are `{uuid}.{stage}`, so the job uuid is recoverable even in the worker's main
    process, where no task context is bound.
    """
    record = event.get("_record")
    args = getattr(record, "data", None)
    if isinstance(args, dict) and isinstance(args.get("id"), str) and isinstance(args.get("name"), str):
        event.setdefault("task", args["name"])
        if event.get("job_uuid") is None and "." in args["id"]:
            event["job_uuid"] = args["id"].rsplit(".", 1)[0]
    return event


def _identity(_: Any, __: str, event: Any) -> Any:
    return event


def bind_job(uuid: str | None, task: str | None) -> None:
    structlog.contextvars.clear_contextvars()
    structlog.contextvars.bind_contextvars(job_uuid=uuid, task=task)


def unbind_job() -> None:
    structlog.contextvars.clear_contextvars()
