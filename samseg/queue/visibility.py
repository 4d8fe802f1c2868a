"""Keep SQS from redelivering a task while it is still running.

SQS hides a received message for the queue's visibility timeout; a task still running when it expires is
delivered again and runs twice. A thread in the worker's main process (it alone holds the receipt handles;
pool children never see them) extends the timeout of every message the worker holds — running, or
prefetched and waiting for a pool slot: Celery puts both in `state.reserved_requests` the moment they are
received — every third of the timeout. If the worker dies, the extensions stop and SQS redelivers after at
most one timeout — which is what recovers a job from a killed worker.

Hence the design: a short base timeout (SAMSEG_VISIBILITY_TIMEOUT_SECONDS, 120 s by default) that the
keeper renews, rather than one longer than the slowest task. A task may run for hours; a killed worker's
messages, prefetched ones included, come back within two minutes instead of an hour.
"""

from __future__ import annotations

import threading
from typing import Any

import structlog

from samseg.core.settings import Settings
from samseg.queue.sqs import sqs_client

log = structlog.get_logger(__name__)


class VisibilityKeeper(threading.Thread):
    def __init__(self, settings: Settings) -> None:
        super().__init__(name="samseg-visibility", daemon=True)
        self.timeout = settings.visibility_timeout_seconds
        self.interval = max(2.0, self.timeout / 3)
        self.client = sqs_client(settings)
        self._stop = threading.Event()

    def run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.extend_all()
            except Exception as exc:  # never let the keeper die: a missed round is retried next interval
                log.warning("visibility_extend_failed", error=repr(exc))

    def extend_all(self) -> int:
        from celery.worker import state

        extended = 0
        for request in snapshot(state.reserved_requests):
            message = getattr(request, "message", None)
            info = getattr(message, "delivery_info", None) or {}
            queue_url = info.get("sqs_queue")
            receipt = getattr(message, "delivery_tag", None)
            if not queue_url or not receipt or getattr(message, "acknowledged", False):
                continue
            try:
                self.client.change_message_visibility(
                    QueueUrl=queue_url, ReceiptHandle=receipt, VisibilityTimeout=self.timeout
                )
                extended += 1
            except self.client.exceptions.ReceiptHandleIsInvalid:
                pass  # acknowledged in the meantime
        return extended

    def stop(self) -> None:
        self._stop.set()


def snapshot(requests: Any) -> list[Any]:
    """The worker's set changes under us; retry the copy rather than lock the event loop."""
    for _ in range(5):
        try:
            return list(requests)
        except RuntimeError:
            continue
    return []


# Below this, a task that outlives the timeout survives only while every keeper round (every third of the
# timeout) is on time: one ChangeMessageVisibility call may take boto's 30 s read timeout.
MIN_KEPT_TIMEOUT_SECONDS = 60


def check_visibility(settings: Settings) -> list[str]:
    """Problems with the queues' visibility timeouts, for a loud warning at worker start.

    Too short means under MIN_KEPT_TIMEOUT_SECONDS and not longer than the segment time limit: long tasks
    then depend on every keeper round being on time. (A queue whose timeout is longer than configured, e.g.
    created by an older samseg with 3600 s, is brought in line by `JobQueues.ensure` at worker start.)
    """
    from samseg.queue.sqs import JobQueues

    problems: list[str] = []
    limit = settings.segment_time_limit_seconds
    configured = settings.visibility_timeout_seconds
    if configured < MIN_KEPT_TIMEOUT_SECONDS and configured <= limit:
        problems.append(
            f"SAMSEG_VISIBILITY_TIMEOUT_SECONDS={configured} is under {MIN_KEPT_TIMEOUT_SECONDS} s and not longer "
            f"than SAMSEG_SEGMENT_TIME_LIMIT_SECONDS={limit}"
        )
    queues = JobQueues(settings)
    for name in (settings.jobs_queue, settings.io_queue, settings.gpu_queue):
        try:
            actual = queues.visibility_timeout(name)
        except Exception:
            continue  # not created yet: kombu/ensure will create it with the configured timeout
        if actual < MIN_KEPT_TIMEOUT_SECONDS and actual <= limit:
            problems.append(f"queue {name} has VisibilityTimeout={actual}s, not longer than the {limit}s task limit")
    return problems
