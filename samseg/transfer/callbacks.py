"""The callback to the app server: PATCH with bounded retries, signed per Standard Webhooks.

Transient failures (connection errors, timeouts, 408, 429, 5xx) are retried with exponential backoff and
full jitter, honouring Retry-After; any other 4xx means the app server rejected the body and retrying
would not change that, so it is reported at once.

With SAMSEG_WEBHOOK_SECRET every attempt carries `webhook-id`, `webhook-timestamp` and `webhook-signature`
(https://www.standardwebhooks.com, signed by the `standardwebhooks` package): the app server can check that
the body came from samseg unchanged, reject replays by their timestamp, and deduplicate retries by their id.
The id is one job run's (`webhook_id_for`), so every retry of that run — in this process or after a task
retry elsewhere — carries the same id, and a re-run of the uuid a new one. The timestamp is each attempt's
own, so a retry an hour later is still inside the receiver's tolerance window.
"""

from __future__ import annotations

import ipaddress
import math
import re
import time
import uuid as uuid_module
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from urllib.parse import urlsplit

import httpx
import structlog
from standardwebhooks import Webhook

from samseg.core.backoff import backoff_delay
from samseg.core.contracts import CallbackBody
from samseg.core.settings import Settings

log = structlog.get_logger(__name__)

RETRYABLE_STATUS = frozenset({408, 425, 429, 500, 502, 503, 504})
CALLBACK_PATH = "/api/v1/re-imagine/auto-mask/{uuid}"


@dataclass(frozen=True)
class Delivery:
    delivered: bool
    attempts: int
    http_status: int | None = None
    error: str | None = None


class InsecureCallbackError(RuntimeError):
    """SAMSEG_REQUIRE_HTTPS_CALLBACK is on and SAMSEG_APP_SERVER_URL would send callbacks in clear."""


# What a webhook-id may hold: it travels as a header value and the receiver keys its dedupe store by it.
_WEBHOOK_ID = re.compile(r"[A-Za-z0-9._~-]{1,256}")


def webhook_id_for(uuid: str, run_id: str) -> str:
    """The `webhook-id` of one job run's callback: `{uuid}.{run_id}`.

    Identical for every attempt and every task retry of that run (the app server's deduplication key), and
    different for a new run of the same uuid (a re-run after a failure is a new message, not a replay).
    uuids never contain '.', so the receiver can split the id back at the last '.'.
    """
    webhook_id = f"{uuid}.{run_id}"
    if not run_id or not _WEBHOOK_ID.fullmatch(webhook_id):
        raise ValueError(f"not usable as a webhook-id: uuid={uuid!r} run_id={run_id!r}")
    return webhook_id


def event_webhook_id(uuid: str, run_id: str, event: str) -> str:
    """The `webhook-id` of a progress event of one run (`{uuid}.{run_id}.{event}`): distinct from the run's
    terminal callback, the same for every resend of that event."""
    return f"{webhook_id_for(uuid, run_id)}.{event}"


def is_loopback_url(url: str) -> bool:
    host = (urlsplit(url).hostname or "").lower()
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_callback_transport(settings: Settings) -> list[str]:
    """Start-up check of where callbacks go; the warnings to log (empty when all is well).

    An `http://` URL to anything but loopback sends the bearer token and the results in clear: a warning,
    or `InsecureCallbackError` with SAMSEG_REQUIRE_HTTPS_CALLBACK=true (call this before consuming, so
    the worker refuses to start rather than failing every job at the end).
    """
    url = settings.app_server_url
    if not url:
        return ["SAMSEG_APP_SERVER_URL is not set: no callback will be sent; results only reach GET /jobs/{uuid}"]
    warnings: list[str] = []
    if urlsplit(url).scheme != "https" and not is_loopback_url(url):
        what = "the bearer token and the results" if settings.app_server_token else "the results"
        message = f"SAMSEG_APP_SERVER_URL={url} is not https: callbacks would send {what} in clear; use an https URL"
        if settings.require_https_callback:
            raise InsecureCallbackError(message + " (SAMSEG_REQUIRE_HTTPS_CALLBACK=true refuses to start)")
        warnings.append(message + " or set SAMSEG_REQUIRE_HTTPS_CALLBACK=true to refuse it")
    if settings.webhook_secret is None and not is_loopback_url(url):
        warnings.append(
            "SAMSEG_WEBHOOK_SECRET is not set: callbacks are not signed, so the app server cannot check "
            "that they come from samseg unchanged"
        )
    return warnings


def callback_url(settings: Settings, uuid: str) -> str | None:
    if not settings.app_server_url:
        return None
    return settings.app_server_url + CALLBACK_PATH.format(uuid=uuid)


@dataclass(frozen=True)
class Attempt:
    """One PATCH: accepted (2xx) or not, with what the app server said."""

    delivered: bool
    http_status: int | None = None
    error: str | None = None
    retry_after: str | None = None

    @property
    def retryable(self) -> bool:
        return not self.delivered and (self.http_status is None or self.http_status in RETRYABLE_STATUS)


def attempt_callback(
    body: CallbackBody,
    settings: Settings,
    *,
    webhook_id: str | None = None,
    clock: Callable[[], float] = time.time,
    client: httpx.Client | None = None,
) -> Attempt:
    """PATCH `body` to the app server once, signed for this moment; never raises for HTTP trouble.

    The callback outbox (samseg.worker.outbox) makes one such attempt per task; `send_callback` loops over it.
    """
    url = callback_url(settings, body.uuid)
    if url is None:
        return Attempt(False, error="no app server configured")
    headers = {"Content-Type": "application/json"}
    if settings.app_server_token:
        headers["Authorization"] = f"Bearer {settings.app_server_token.get_secret_value()}"
    payload = body.model_dump_json(exclude_none=True)
    if settings.webhook_secret is not None:
        signer = Webhook(settings.webhook_secret.get_secret_value())
        headers |= signature_headers(signer, webhook_id or f"msg_{uuid_module.uuid4().hex}", payload, clock())
    owned = client is None
    http = client or httpx.Client(timeout=settings.callback_timeout_seconds)
    try:
        response = http.patch(url, content=payload.encode("utf-8"), headers=headers)
    except httpx.HTTPError as exc:
        return Attempt(False, None, f"{type(exc).__name__}: {exc}")
    finally:
        if owned:
            http.close()
    if response.is_success:
        log.info("callback_delivered", http_status=response.status_code, webhook_id=webhook_id)
        return Attempt(True, response.status_code)
    if response.status_code not in RETRYABLE_STATUS:
        log.error("callback_rejected", http_status=response.status_code, body=response.text[:500])
    return Attempt(False, response.status_code, f"HTTP {response.status_code}", response.headers.get("retry-after"))


def send_callback(
    body: CallbackBody,
    settings: Settings,
    *,
    webhook_id: str | None = None,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.time,
) -> Delivery:
    """PATCH `body`, retrying transient failures in this process (`samseg segment --notify` and tools; the
    worker uses the outbox instead); never raises for HTTP trouble.

    `webhook_id` should be `webhook_id_for(uuid, run_id)`; without one (and with a webhook secret) a random
    id is used, shared by this call's attempts only. `clock` is the signing time source (tests move it).
    """
    if callback_url(settings, body.uuid) is None:
        log.info("callback_skipped", reason="SAMSEG_APP_SERVER_URL is not set", status=body.status)
        return Delivery(delivered=False, attempts=0, error="no app server configured")
    if settings.webhook_secret is not None and webhook_id is None:
        webhook_id = f"msg_{uuid_module.uuid4().hex}"
    last = Delivery(delivered=False, attempts=0)
    with httpx.Client(timeout=settings.callback_timeout_seconds) as client:
        for attempt in range(1, settings.callback_max_attempts + 1):
            result = attempt_callback(body, settings, webhook_id=webhook_id, clock=clock, client=client)
            if result.delivered:
                return Delivery(True, attempt, result.http_status)
            last = Delivery(False, attempt, result.http_status, result.error)
            if not result.retryable:
                return last
            if attempt < settings.callback_max_attempts:
                delay = backoff_delay(attempt - 1, settings, result.retry_after)
                log.warning("callback_retry", attempt=attempt, error=last.error, retry_in=round(delay, 2))
                sleep(delay)
    log.error("callback_failed", attempts=last.attempts, error=last.error)
    return last


def signature_headers(signer: Webhook, webhook_id: str, payload: str, now: float) -> dict[str, str]:
    """The three Standard Webhooks headers for one attempt, signed over exactly the bytes that are sent."""
    seconds = math.floor(now)
    signature = signer.sign(webhook_id, datetime.fromtimestamp(seconds, tz=UTC), payload)
    return {"webhook-id": webhook_id, "webhook-timestamp": str(seconds), "webhook-signature": signature}
