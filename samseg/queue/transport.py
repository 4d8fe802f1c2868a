"""samseg's SQS transport: kombu's, subclassed (`broker_transport = "samseg.queue.transport:Transport"`).

kombu chooses a transport by `module:Class`, so the fixes below are a Channel subclass rather than methods
replaced in place: they apply to the connections of the samseg app and to nothing else in the process.

1. kombu's async SQS client turns a timeout or 5xx response (and pycurl's 599 for any connection error)
   into an empty *list*, but `Channel._on_messages_ready` then calls `.get("Messages")` on it: the
   AttributeError ends the worker with "Unrecoverable error". One SQS 503 — or a network blip — stops
   consumption. A non-dict response now counts as "no messages"; the next poll retries as usual.
2. kombu parses every SQS body as a possible kombu envelope: base64-decodes it, JSON-decodes it, and takes a
   top-level `properties` key for its own. On the app server's raw JSON queue that is wrong, and some bodies
   (`{"properties": "x"}`, deep nesting, base64 text, an envelope declaring pickle) raise inside kombu,
   before samseg's ingress sees them — again "Unrecoverable error". Messages of the queues named in the
   transport option `samseg_raw_queues` are handed over untouched (the body as text, no content type),
   exactly the shape kombu gives any body that is not JSON; samseg's ingress validates and dead-letters them.
3. Prompt polling (samseg.queue.polling, kombu #1783/#2413/#2439) when the transport option
   `samseg_prompt_polling` is true (SAMSEG_SQS_PROMPT_POLLING).
4. A channel with no event loop (Flower's synchronous event capture, any ConsumerMixin) deletes no-ack messages
   through the blocking boto3 client: kombu 5.7 always uses its pycurl client there, which needs a hub and fails
   with `'NoneType' object has no attribute 'on_close'` on the first message (kombu #746/#758 are the same
   family). The worker always has a hub and keeps kombu's asynchronous path.

All four are written against kombu 5.7.0 (FIXED_VERSIONS): on another kombu the Channel behaves exactly as
kombu's own, with a warning, until the fixes are checked against it.
"""

from __future__ import annotations

import time
from typing import Any

import kombu
import structlog
from kombu.transport import SQS
from vine import promise

from samseg.queue import polling

log = structlog.get_logger(__name__)

FIXED_VERSIONS = {"5.7.0"}
TRANSPORT = "samseg.queue.transport:Transport"


def fixes_apply() -> bool:
    """True on the kombu version the fixes were written against; else kombu's own behaviour (and a warning)."""
    if kombu.__version__ in FIXED_VERSIONS:
        return True
    log.warning("sqs_transport_fix_skipped", kombu=kombu.__version__, tested=sorted(FIXED_VERSIONS))
    return False


class Channel(SQS.Channel):  # type: ignore[misc]
    """kombu's SQS channel with samseg's fixes (see the module docstring)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        options = self.transport_options
        self._samseg_fixed = fixes_apply()
        self._samseg_raw_queues = frozenset(options.get("samseg_raw_queues") or ())
        self._samseg_prompt = self._samseg_fixed and bool(options.get("samseg_prompt_polling", False))

    # --- 1. a failed poll is "no messages", not a dead worker --------------------------------------------
    def _on_messages_ready(self, queue: Any, qname: str, messages: Any) -> int:
        if self._samseg_fixed and not isinstance(messages, dict):
            log.warning("sqs_poll_failed", queue=qname, detail="timeout, 5xx or connection error; polling again")
            if self._samseg_prompt:
                polling.state(self).failed.add(qname)
            return 0
        result: int = super()._on_messages_ready(queue, qname, messages)
        return result

    # --- 2. the app server's raw JSON is handed over untouched ----------------------------------------------
    def _message_to_python(self, message: dict[str, Any], queue_name: str, q_url: str) -> Any:
        if not self._samseg_fixed or queue_name not in self._samseg_raw_queues:
            return super()._message_to_python(message, queue_name, q_url)
        text = message.get("Body") or ""
        # The default exchange and the queue's own name as routing key: what kombu's requeue needs to find the
        # queue again (with an empty delivery_info, Message.requeue() raised KeyError('exchange')).
        delivery_info = {"exchange": "", "routing_key": queue_name}
        envelope = {"body": text, "properties": {"delivery_info": delivery_info}}
        return self._envelope_payload(envelope, text, message, q_url)

    # --- 3. prompt polling ------------------------------------------------------------------------------------
    def _schedule_queue(self, queue: str) -> None:
        if not self._samseg_prompt:
            super()._schedule_queue(queue)
            return
        if queue not in self._active_queues:
            return
        state = polling.state(self)
        if self.qos.can_consume():
            state.polled_at[queue] = time.monotonic()
            self._get_bulk_async(queue, callback=promise(self._loop1, (queue,)))
            return
        if queue not in state.parked:
            state.parked.add(queue)
            state.timers[queue] = self.hub.call_later(polling.retry_delay(self), polling.resume, self, queue)
            if self.qos.can_consume():
                # A slot freed on another thread between the check above and the park, so its wake-up saw
                # nothing parked: resume now rather than at the safety re-check.
                polling.resume(self, queue)

    def _loop1(self, queue: str, messages_fetched: Any = None) -> None:
        if not self._samseg_prompt:
            super()._loop1(queue, messages_fetched)
            return
        delay = polling.next_delay(self, queue, bool(messages_fetched))
        if delay:
            self.hub.call_later(delay, self._schedule_queue, queue)
        else:
            self.hub.call_soon(self._schedule_queue, queue)

    def basic_ack(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return super().basic_ack(*args, **kwargs)
        finally:
            if self._samseg_prompt:
                polling.wake(self)

    def basic_reject(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return super().basic_reject(*args, **kwargs)
        finally:
            if self._samseg_prompt:
                polling.wake(self)

    # --- 4. no-ack deletes without an event loop ----------------------------------------------------------
    def _delete_message(self, queue_name: str, message: Any) -> Any:
        if not self._samseg_fixed or self.hub is not None:
            return super()._delete_message(queue_name, message)
        self.sqs(queue=queue_name).delete_message(
            QueueUrl=self._new_queue(queue_name), ReceiptHandle=message["ReceiptHandle"]
        )
        return None

    def close(self) -> Any:
        polling.forget(self)
        return super().close()


class Transport(SQS.Transport):  # type: ignore[misc]
    """kombu's SQS transport with samseg's Channel; selected by Celery's `broker_transport` (TRANSPORT)."""

    Channel = Channel
