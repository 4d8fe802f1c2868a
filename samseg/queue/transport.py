"""Two fixes for kombu 5.7.0's SQS transport, both about messages or responses that kill the worker.

1. kombu's async SQS client turns a timeout or 5xx response (and pycurl's 599 for any connection error)
   into an empty *list*, but `Channel._on_messages_ready` then calls `.get("Messages")` on it: the
   AttributeError ends the worker with "Unrecoverable error". One SQS 503 — or a network blip — stops
   consumption. A non-dict response now counts as "no messages"; the next poll retries as usual.
2. kombu parses every SQS body as a possible kombu envelope: base64-decodes it, JSON-decodes it, and takes a
   top-level `properties` key for its own. On the app server's raw JSON queue that is wrong, and some bodies
   (`{"properties": "x"}`, deep nesting, base64 text, an envelope declaring pickle) raise inside kombu,
   before samseg's ingress sees them — again "Unrecoverable error". Messages of the queues named in
   `raw_queues` are handed over untouched (the body as text, no content type), exactly the shape kombu
   gives any body that is not JSON; samseg's ingress validates and dead-letters them itself.

`apply` also installs samseg.queue.polling (prompt polling: the next message is asked for as soon as a
prefetch slot frees) unless SAMSEG_SQS_PROMPT_POLLING is off.
"""

from __future__ import annotations

import functools
from typing import Any

import kombu
import structlog

log = structlog.get_logger(__name__)

FIXED_VERSIONS = {"5.7.0"}


def apply(raw_queues: frozenset[str] = frozenset(), prompt_polling: bool | None = None) -> bool:
    """Install both fixes (and prompt polling: None reads SAMSEG_SQS_PROMPT_POLLING); False if not kombu 5.7.0."""
    if kombu.__version__ not in FIXED_VERSIONS:
        # Another kombu: the bug may be gone or the method changed shape; check before extending the set.
        log.warning("sqs_transport_fix_skipped", kombu=kombu.__version__, tested=sorted(FIXED_VERSIONS))
        return False
    from kombu.transport.SQS import Channel

    original = Channel._on_messages_ready
    if getattr(original, "_samseg_fixed", False):
        return True
    if prompt_polling is None:
        from samseg.core.settings import get_settings

        prompt_polling = get_settings().sqs_prompt_polling

    @functools.wraps(original)
    def on_messages_ready(self: Any, queue: Any, qname: str, messages: Any) -> int:
        if not isinstance(messages, dict):
            log.warning("sqs_poll_failed", queue=qname, detail="timeout, 5xx or connection error; polling again")
            return 0
        result: int = original(self, queue, qname, messages)
        return result

    parse = Channel._message_to_python

    @functools.wraps(parse)
    def message_to_python(self: Any, message: dict[str, Any], queue_name: str, q_url: str) -> Any:
        if queue_name not in raw_queues:
            return parse(self, message, queue_name, q_url)
        text = message.get("Body") or ""
        # The default exchange and the queue's own name as routing key: what kombu's requeue needs to find the
        # queue again (with an empty delivery_info, Message.requeue() raised KeyError('exchange')).
        delivery_info = {"exchange": "", "routing_key": queue_name}
        return self._envelope_payload(
            {"body": text, "properties": {"delivery_info": delivery_info}}, text, message, q_url
        )

    on_messages_ready._samseg_fixed = True  # type: ignore[attr-defined]
    Channel._on_messages_ready = on_messages_ready
    Channel._message_to_python = message_to_python
    # After the fixes above: its own _on_messages_ready wrapper must see the failed polls first.
    from samseg.queue import polling as sqs_polling

    sqs_polling.apply(prompt_polling)
    return True
