"""The scaling signal as metrics: backlog per queue (for backlog per worker) and how long jobs wait in SQS.

- **Backlog** (API, `samseg_queue_backlog{queue}`): visible + in-flight messages of each queue, read by the API's
  background poller — the same quantity KEDA (`scaleOnInFlight: true`) and the ECS target tracking divide by
  the number of workers. Prometheus has the worker count (every worker is a scrape target), so backlog per
  worker is a query, not a sample: `samseg_queue_backlog{queue="samseg-gpu"} / count(up{component="worker-gpu"}
  == 1)` (docs/capacity.md).
- **Wait in SQS** (workers, `samseg_queue_wait_seconds{queue}` histogram and
  `samseg_queue_last_wait_seconds{queue}`): SQS does not return a message's age from GetQueueAttributes (only
  CloudWatch has `ApproximateAgeOfOldestMessage`, per minute), and peeking at a queue would count as a receive
  and push messages toward the dead-letter queue. So every worker records, when it receives a task message,
  now minus the message's `SentTimestamp` (kombu fetches it: `fetch_message_attributes` in samseg.worker.config).
  Messages are taken roughly oldest first, so the last wait is the age of the oldest job at the moment a
  worker took it. It is silent while no worker receives anything — with the GPU workers scaled to zero, or all
  stuck — so alert on CloudWatch's `ApproximateAgeOfOldestMessage` of the gpu queue as well.

Recorded in the worker's main process (`task_received`, every pool), served by its own /metrics.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client.core import GaugeMetricFamily, Metric

from samseg.ops import metrics
from samseg.ops.metrics import QueueDepthPoller

SENT_TIMESTAMP = "SentTimestamp"
# kombu's SQS transport option: the system attributes fetched with every message (ApproximateReceiveCount is
# what kombu itself needs).
FETCH_MESSAGE_ATTRIBUTES = ["ApproximateReceiveCount", SENT_TIMESTAMP]


def message_wait(message: Any, now: float | None = None) -> tuple[str, float] | None:
    """(queue name, seconds since SQS accepted it) of a kombu SQS message, or None if it carries no timestamp."""
    info = getattr(message, "delivery_info", None) or {}
    sqs_message = info.get("sqs_message") or {}
    sent = (sqs_message.get("Attributes") or {}).get(SENT_TIMESTAMP)
    queue = info.get("routing_key") or str(info.get("sqs_queue", "")).rsplit("/", 1)[-1]
    if not sent or not queue:
        return None
    try:
        seconds = (now if now is not None else time.time()) - int(sent) / 1000.0
    except (TypeError, ValueError):
        return None
    return str(queue), max(0.0, seconds)


def _on_task_received(request: Any = None, **_: Any) -> None:
    wait = message_wait(getattr(request, "message", None))
    if wait is not None:
        recorded = metrics.instruments()
        recorded.queue_wait.labels(wait[0]).observe(wait[1])
        recorded.queue_last_wait.labels(wait[0]).set(round(wait[1], 3))


_installed = False


def install() -> None:
    """Record every received task message's wait in SQS (call once in the worker's main process)."""
    global _installed
    if _installed:
        return
    from celery import signals

    signals.task_received.connect(_on_task_received, weak=False)
    _installed = True


# --- the API side ----------------------------------------------------------------------------------------
class BacklogPoller(QueueDepthPoller):
    """Visible + in-flight messages per queue, read in the background like the queue depth."""

    def collect(self) -> Iterator[Metric]:
        backlog = GaugeMetricFamily(
            "samseg_queue_backlog",
            "Messages waiting or held by a worker (ApproximateNumberOfMessages + NotVisible): what autoscalers divide "
            "by the worker count",
            labels=["queue"],
        )
        latest = self.latest()
        if latest is not None and latest[0] <= 3 * self.interval:
            for name, value in latest[1].items():
                backlog.add_metric([name], value)
        yield backlog


def backlog_reader(client: Any, url: Callable[[str], str], names: tuple[str, ...]) -> Callable[[], dict[str, int]]:
    """A read function for BacklogPoller: one GetQueueAttributes per queue."""

    def read() -> dict[str, int]:
        out: dict[str, int] = {}
        for name in names:
            attrs = client.get_queue_attributes(
                QueueUrl=url(name),
                AttributeNames=["ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"],
            )["Attributes"]
            out[name] = int(attrs["ApproximateNumberOfMessages"]) + int(attrs["ApproximateNumberOfMessagesNotVisible"])
        return out

    return read


__all__ = ["FETCH_MESSAGE_ATTRIBUTES", "BacklogPoller", "backlog_reader", "install", "message_wait", "metrics"]
