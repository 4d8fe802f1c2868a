"""Check that a callback comes from samseg unchanged (Standard Webhooks) and parse it into typed objects."""

from __future__ import annotations

import json
from collections.abc import Mapping

from pydantic import ValidationError
from standardwebhooks import Webhook
from standardwebhooks.webhooks import WebhookVerificationError

from samseg.core.contracts import CallbackBody, ResultDocument


class CallbackVerificationError(ValueError):
    """The signature is missing or wrong, the timestamp outside the tolerance, or the body not a callback."""


def verify_callback(body: bytes | str, headers: Mapping[str, str], secret: str) -> CallbackBody:
    """Verify the `webhook-id`/`-timestamp`/`-signature` headers over the raw body with the shared
    `whsec_…` secret (SAMSEG_WEBHOOK_SECRET), then parse the body.

    Pass the body exactly as received (bytes), before any JSON parsing. Deduplicate on
    `headers["webhook-id"]`: every retry of one job run carries the same id.
    """
    lowered = {key.lower(): value for key, value in headers.items()}
    payload = body.decode("utf-8") if isinstance(body, bytes) else body
    try:
        Webhook(secret).verify(payload, lowered)
    except WebhookVerificationError as exc:
        raise CallbackVerificationError(f"callback signature rejected: {exc}") from exc
    try:
        return CallbackBody.model_validate(json.loads(payload))
    except (ValueError, ValidationError) as exc:
        raise CallbackVerificationError(f"signed body is not a samseg callback: {exc}") from exc


def parse_result(data: bytes | str) -> ResultDocument:
    """A downloaded result.json."""
    return ResultDocument.model_validate_json(data)
