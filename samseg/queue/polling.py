"""Prompt SQS polling for kombu 5.7.0: the next message is asked for the moment a worker can take it.

kombu's SQS transport runs one poll loop per queue on the worker's event loop (`Channel._schedule_queue` →
ReceiveMessage → `_loop1` → `_schedule_queue` …). Two of its timing rules leave a worker idle with work
waiting on its queue (kombu #1783, #2413, #2439; #2489 documented the first one):

1. When the prefetch slots are full (a segment worker with `-c 1` and prefetch multiplier 1 while its task
   runs), `_schedule_queue` does not poll and re-checks only after `polling_interval` (1 s). The slot frees
   when the task is acknowledged, but nothing wakes the loop: the next task starts up to a second later —
   0.5 s on average, the 0.6-0.8 s idle gap measured between consecutive segment tasks under a backlog and
   the ~0.4 s hop into an idle segment worker when jobs come one after another (issue 11).
2. After an empty long poll (`wait_time_seconds`, 10 s) it sleeps `polling_interval` on top, so a message
   sent in that window waits for it.

With `apply(True)`:

- a queue whose slots are full is *parked*; acknowledging or rejecting a message on its channel (the only
  ways a slot frees) resumes it through the hub's `call_soon`, which is thread-safe and wakes the event loop
  (the threads pool acknowledges from its own threads). A safety re-check every `polling_interval` (at least
  1 s) keeps kombu's old behaviour as the worst case if a slot frees some other way (a prefetch change);
- after an empty *long* poll the next one starts at once: long polling is the wait, one ReceiveMessage per
  `wait_time_seconds` per idle queue, as before;
- a failed poll (timeout, 5xx, connection refused — see sqs_transport_fix) and an empty poll that came back
  much sooner than the long-poll wait (an emulator ignoring WaitTimeSeconds) still wait `polling_interval`
  (at least 1 s): no busy loop while SQS is unreachable.

Each queue keeps exactly one loop: a parked queue has no ReceiveMessage in flight, and only the first of
(wake-up, safety timer) resumes it. Patches are applied once, only to kombu 5.7.0 (checked), and only in
processes that call `apply` (samseg.queue.transport does, from the Celery app module).
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass, field
from typing import Any

import kombu
import structlog

log = structlog.get_logger(__name__)

FIXED_VERSIONS = {"5.7.0"}
# An empty long poll that returns sooner than this fraction of wait_time_seconds did not long-poll.
_EARLY_EMPTY_FRACTION = 0.5
_MIN_RETRY_SECONDS = 1.0


@dataclass
class _PollState:
    """Per-channel bookkeeping; touched only on the hub thread except `parked` (read by `wake`)."""

    parked: set[str] = field(default_factory=set)
    timers: dict[str, Any] = field(default_factory=dict)
    failed: set[str] = field(default_factory=set)
    polled_at: dict[str, float] = field(default_factory=dict)


def _state(channel: Any) -> _PollState:
    state: _PollState | None = channel.__dict__.get("_samseg_poll")
    if state is None:
        state = channel.__dict__.setdefault("_samseg_poll", _PollState())
    return state


def _retry_delay(channel: Any) -> float:
    return max(float(channel.connection.polling_interval or 0), _MIN_RETRY_SECONDS)


def _resume(channel: Any, queue: str) -> None:
    """Leave the parked state (hub thread); the first of wake-up and safety timer wins."""
    state = _state(channel)
    if queue not in state.parked:
        return
    state.parked.discard(queue)
    timer = state.timers.pop(queue, None)
    if timer is not None:
        timer.cancel()
    channel._schedule_queue(queue)


def _resume_all(channel: Any) -> None:
    for queue in list(_state(channel).parked):
        _resume(channel, queue)


def _wake(channel: Any) -> None:
    """A prefetch slot freed (any thread): resume the channel's parked queues on the hub thread.

    Only the set's truth value is read here; it is iterated on the hub thread, which alone changes it.
    """
    state = channel.__dict__.get("_samseg_poll")
    hub = getattr(channel, "hub", None)
    if state is not None and hub is not None and state.parked:
        hub.call_soon(_resume_all, channel)


def apply(enabled: bool = True) -> bool:
    """Install prompt polling on kombu's SQS Channel; False (and kombu's own timing) when not applied."""
    if not enabled:
        return False
    if kombu.__version__ not in FIXED_VERSIONS:
        log.warning("sqs_prompt_polling_skipped", kombu=kombu.__version__, tested=sorted(FIXED_VERSIONS))
        return False
    from kombu.transport.SQS import Channel
    from vine import promise

    if getattr(Channel._schedule_queue, "_samseg_prompt", False):
        return True

    def schedule_queue(self: Any, queue: str) -> None:
        if queue not in self._active_queues:
            return
        state = _state(self)
        if self.qos.can_consume():
            state.polled_at[queue] = time.monotonic()
            self._get_bulk_async(queue, callback=promise(self._loop1, (queue,)))
            return
        if queue not in state.parked:
            state.parked.add(queue)
            state.timers[queue] = self.hub.call_later(_retry_delay(self), _resume, self, queue)
            if self.qos.can_consume():
                # A slot freed on another thread between the check above and the park, so its wake-up saw
                # nothing parked: resume now rather than at the safety re-check.
                _resume(self, queue)

    def loop1(self: Any, queue: str, messages_fetched: Any = None) -> None:
        if messages_fetched:
            self.hub.call_soon(self._schedule_queue, queue)
            return
        state = _state(self)
        failed = queue in state.failed
        state.failed.discard(queue)
        waited = time.monotonic() - state.polled_at.get(queue, 0.0)
        long_polled = self.wait_time_seconds > 0 and waited >= _EARLY_EMPTY_FRACTION * self.wait_time_seconds
        if failed or not long_polled:
            delay = float(self.connection.polling_interval or 0)
            if failed or self.wait_time_seconds > 0:
                delay = max(delay, _MIN_RETRY_SECONDS)
            if delay:
                self.hub.call_later(delay, self._schedule_queue, queue)
                return
        self.hub.call_soon(self._schedule_queue, queue)

    ready = Channel._on_messages_ready

    @functools.wraps(ready)
    def on_messages_ready(self: Any, queue: Any, qname: str, messages: Any) -> int:
        if not isinstance(messages, dict):
            _state(self).failed.add(qname)
        result: int = ready(self, queue, qname, messages)
        return result

    def releasing(method: Any) -> Any:
        @functools.wraps(method)
        def release(self: Any, *args: Any, **kwargs: Any) -> Any:
            try:
                return method(self, *args, **kwargs)
            finally:
                _wake(self)

        return release

    close = Channel.close

    @functools.wraps(close)
    def close_channel(self: Any) -> Any:
        state = self.__dict__.get("_samseg_poll")
        if state is not None:
            for timer in state.timers.values():
                timer.cancel()
            state.timers.clear()
            state.parked.clear()
        return close(self)

    schedule_queue._samseg_prompt = True  # type: ignore[attr-defined]
    Channel._schedule_queue = schedule_queue
    Channel._loop1 = loop1
    Channel._on_messages_ready = on_messages_ready
    Channel.basic_ack = releasing(Channel.basic_ack)
    Channel.basic_reject = releasing(Channel.basic_reject)
    Channel.close = close_channel
    return True
