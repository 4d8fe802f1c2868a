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

With prompt polling on:

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
(wake-up, safety timer) resumes it. These are behaviours of `samseg.queue.transport.Channel` (a subclass of
kombu's SQS Channel, chosen by Celery's `broker_transport`), active only on kombu 5.7.0 (checked) and with
SAMSEG_SQS_PROMPT_POLLING on.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import structlog

log = structlog.get_logger(__name__)

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


def state(channel: Any) -> _PollState:
    state: _PollState | None = channel.__dict__.get("_samseg_poll")
    if state is None:
        state = channel.__dict__.setdefault("_samseg_poll", _PollState())
    return state


def retry_delay(channel: Any) -> float:
    return max(float(channel.connection.polling_interval or 0), _MIN_RETRY_SECONDS)


def resume(channel: Any, queue: str) -> None:
    """Leave the parked state (hub thread); the first of wake-up and safety timer wins."""
    polls = state(channel)
    if queue not in polls.parked:
        return
    polls.parked.discard(queue)
    timer = polls.timers.pop(queue, None)
    if timer is not None:
        timer.cancel()
    channel._schedule_queue(queue)


def resume_all(channel: Any) -> None:
    for queue in list(state(channel).parked):
        resume(channel, queue)


def wake(channel: Any) -> None:
    """A prefetch slot freed (any thread): resume the channel's parked queues on the hub thread.

    Only the set's truth value is read here; it is iterated on the hub thread, which alone changes it.
    """
    polls = channel.__dict__.get("_samseg_poll")
    hub = getattr(channel, "hub", None)
    if polls is not None and hub is not None and polls.parked:
        hub.call_soon(resume_all, channel)


def next_delay(channel: Any, queue: str, messages_fetched: bool) -> float:
    """Seconds until `queue` is polled again after a poll ended (0: at once, on the next loop iteration).

    At once after messages or after an empty *long* poll (the long poll was the wait); after a failed poll, or an
    empty poll that came back much sooner than the long-poll wait, `polling_interval` (at least 1 s).
    """
    if messages_fetched:
        return 0.0
    polls = state(channel)
    failed = queue in polls.failed
    polls.failed.discard(queue)
    waited = time.monotonic() - polls.polled_at.get(queue, 0.0)
    long_polled = channel.wait_time_seconds > 0 and waited >= _EARLY_EMPTY_FRACTION * channel.wait_time_seconds
    if not failed and long_polled:
        return 0.0
    delay = float(channel.connection.polling_interval or 0)
    if failed or channel.wait_time_seconds > 0:
        delay = max(delay, _MIN_RETRY_SECONDS)
    return delay


def forget(channel: Any) -> None:
    """A closing channel: cancel its safety timers and forget its parked queues."""
    polls = channel.__dict__.get("_samseg_poll")
    if polls is not None:
        for timer in polls.timers.values():
            timer.cancel()
        polls.timers.clear()
        polls.parked.clear()
