"""The one backoff schedule for callbacks: exponential with full jitter, a server's Retry-After honoured."""

from __future__ import annotations

import random

from samseg.core.settings import Settings


def backoff_delay(attempt: int, settings: Settings, retry_after: str | None = None) -> float:
    """Full jitter: uniform in [0, min(cap, base·2^attempt)]; a server's Retry-After wins (capped).

    Full jitter spreads the retries of many callbacks that failed together (an app-server outage) instead of
    sending them back in waves.
    """
    cap = settings.callback_backoff_max_seconds
    if retry_after is not None:
        try:
            return min(cap, max(0.0, float(retry_after)))
        except ValueError:
            pass  # an HTTP date: fall back to our own schedule
    return random.uniform(0, min(cap, settings.callback_backoff_seconds * 2**attempt))
