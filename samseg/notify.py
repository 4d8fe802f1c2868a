"""The callback to the app server: PATCH with bounded retries.

Transient failures (connection errors, timeouts, 408, 429, 5xx) are retried with exponential backoff and
full jitter, honouring Retry-After; any other 4xx means the app server rejected the body and retrying
would not change that, so it is reported at once.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass

import httpx
import structlog

from samseg.contracts import CallbackBody
from samseg.settings import Settings

log = structlog.get_logger(__name__)

RETRYABLE_STATUS = frozenset({408, 425, 429, 500, 502, 503, 504})
CALLBACK_PATH = "/api/v1/re-imagine/auto-mask/{uuid}"


@dataclass(frozen=True)
class Delivery:
    delivered: bool
    attempts: int
    http_status: int | None = None
    error: str | None = None


def callback_url(settings: Settings, uuid: str) -> str | None:
    if not settings.app_server_url:
        return None
    return settings.app_server_url + CALLBACK_PATH.format(uuid=uuid)


def backoff_delay(attempt: int, settings: Settings, retry_after: str | None = None) -> float:
    """Full jitter: uniform in [0, min(cap, base·2^attempt)]; a server's Retry-After wins (capped)."""
    cap = settings.callback_backoff_max_seconds
    if retry_after is not None:
        try:
            return min(cap, max(0.0, float(retry_after)))
        except ValueError:
            pass  # an HTTP date: fall back to our own schedule
    return random.uniform(0, min(cap, settings.callback_backoff_seconds * 2**attempt))


def send_callback(body: CallbackBody, settings: Settings, *, sleep: Callable[[float], None] = time.sleep) -> Delivery:
    url = callback_url(settings, body.uuid)
    if url is None:
        log.info("callback_skipped", reason="SAMSEG_APP_SERVER_URL is not set", status=body.status)
        return Delivery(delivered=False, attempts=0, error="no app server configured")
    headers = {"Content-Type": "application/json"}
    if settings.app_server_token:
        headers["Authorization"] = f"Bearer {settings.app_server_token}"
    payload = body.model_dump_json(exclude_none=True)
    last = Delivery(delivered=False, attempts=0)
    with httpx.Client(timeout=settings.callback_timeout_seconds) as client:
        for attempt in range(1, settings.callback_max_attempts + 1):
            retry_after = None
            try:
                response = client.patch(url, content=payload, headers=headers)
            except httpx.HTTPError as exc:
                last = Delivery(False, attempt, None, f"{type(exc).__name__}: {exc}")
            else:
                if response.is_success:
                    log.info("callback_delivered", http_status=response.status_code, attempts=attempt)
                    return Delivery(True, attempt, response.status_code)
                last = Delivery(False, attempt, response.status_code, f"HTTP {response.status_code}")
                if response.status_code not in RETRYABLE_STATUS:
                    log.error("callback_rejected", http_status=response.status_code, body=response.text[:500])
                    return last
                retry_after = response.headers.get("retry-after")
            if attempt < settings.callback_max_attempts:
                delay = backoff_delay(attempt - 1, settings, retry_after)
                log.warning("callback_retry", attempt=attempt, error=last.error, retry_in=round(delay, 2))
                sleep(delay)
    log.error("callback_failed", attempts=last.attempts, error=last.error)
    return last
