"""structlog set-up shared by the worker, beat, the API and the CLI.

JSON lines when stderr is not a terminal (containers, log shippers), coloured key=value on a terminal.
Celery's and uvicorn's stdlib loggers go through the same renderer, so every line has one shape, and the
job uuid and task name bound in contextvars (see `bind_job`) appear on every line written during a task.

Secrets stay out of every line (`SecretRedactor`, the last step before rendering): the configured tokens and
secrets are replaced wherever they occur, every http(s) URL loses its query string and fragment (presigned
image URLs carry credentials there), and a `signature=` parameter in a bare path (uvicorn's access lines for
signed mask URLs) is masked. Code that logs a URL should still pass it through `redact_url` itself; the
redactor is the net under it.
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import Iterable, MutableMapping
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import structlog

REDACTED = "[redacted]"
# Secrets shorter than this are not searched for: replacing a 3-letter "secret" would garble ordinary words.
MIN_REDACTED_SECRET_CHARS = 8
_URL = re.compile(r"https?://[^\s\"'<>]+", re.IGNORECASE)
_SIGNATURE_PARAM = re.compile(r"([?&]signature=)[^&\s\"'<>#]+")
_MAX_DEPTH = 6


def redact_url(url: str) -> str:
    """`scheme://host[:port]/path` — no userinfo, no query string, no fragment — for logs and error messages.

    Presigned URLs (S3, GCS, Azure SAS, CDNs) carry their credentials in the query string; userinfo is a
    password. What remains still says which image it was.
    """
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        port = parts.port
    except ValueError:
        return "<unparsable URL>"
    if ":" in host:
        host = f"[{host}]"
    netloc = host + (f":{port}" if port is not None else "")
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def redact_text(text: str) -> str:
    """Every http(s) URL in free text (an error message, a raw message body) through `redact_url`."""
    if "://" in text:
        text = _URL.sub(lambda m: redact_url(m.group(0)), text)
    if "signature=" in text:
        text = _SIGNATURE_PARAM.sub(lambda m: m.group(1) + REDACTED, text)
    return text


class SecretRedactor:
    """A structlog processor: known secret values and URL query strings out of every value of the event."""

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        # Longest first, so a secret that contains another is replaced whole.
        unique = {s for s in secrets if len(s) >= MIN_REDACTED_SECRET_CHARS}
        self.secrets = sorted(unique, key=len, reverse=True)

    def __call__(self, _: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
        for key, value in list(event.items()):
            event[key] = self._clean(value, 0)
        return event

    def _text(self, text: str) -> str:
        for secret in self.secrets:
            if secret in text:
                text = text.replace(secret, REDACTED)
        return redact_text(text)

    def _clean(self, value: Any, depth: int) -> Any:
        if isinstance(value, str):
            return self._text(value)
        if value is None or isinstance(value, bool | int | float):
            return value
        if depth >= _MAX_DEPTH:
            return value
        if isinstance(value, dict):
            return {k: self._clean(v, depth + 1) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return type(value)(self._clean(v, depth + 1) for v in value)
        # Anything else is rendered through its repr (JSON) or str/repr (console): clean that text, and
        # replace the object only when it held something to hide, so ordinary values render as before.
        try:
            shown = repr(value)
        except Exception:
            return value
        cleaned = self._text(shown)
        return value if cleaned == shown else cleaned


def _configured_secrets() -> list[str]:
    from samseg.core.settings import get_settings

    try:
        return get_settings().secret_values()
    except Exception:  # invalid settings: the caller is about to report that; log what we can meanwhile
        return []


def configure_logging(level: str = "INFO", json: bool | None = None, secrets: Iterable[str] | None = None) -> None:
    """Set up structlog and the stdlib root logger; `secrets` default to every secret in the Settings."""
    render_json = (not sys.stderr.isatty()) if json is None else json
    redactor = SecretRedactor(_configured_secrets() if secrets is None else secrets)
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
            redactor,
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
