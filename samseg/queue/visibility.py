"""Keep SQS from redelivering a task while it is still running.

SQS hides a received message for the queue's visibility timeout; a task still running when it expires is
delivered again and runs twice. A thread in the worker's main process (it alone holds the receipt handles;
pool children never see them) extends the timeout of every message the worker holds — running, or
prefetched and waiting for a pool slot (`state.reserved_requests`), or waiting for its countdown/ETA (a stage
retry: `state.scheduled_requests` until it fires) — every third of the timeout, ten per
ChangeMessageVisibilityBatch call. If the worker dies, the extensions stop and SQS redelivers after at
most one timeout — which is what recovers a job from a killed worker.

Hence the design: a short base timeout (SAMSEG_VISIBILITY_TIMEOUT_SECONDS, 120 s by default) that the
keeper renews, rather than one longer than the slowest task. A task may run for hours; a killed worker's
messages, prefetched ones included, come back within two minutes instead of an hour.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import structlog
from botocore.exceptions import BotoCoreError, ClientError

from samseg.core.settings import Settings
from samseg.queue.sqs import sqs_client

if TYPE_CHECKING:
    from mypy_boto3_sqs import SQSClient

log = structlog.get_logger(__name__)

BATCH = 10  # ChangeMessageVisibilityBatch takes at most 10 entries
# The keeper's own client: a round must end well within a third of the timeout even while SQS is slow or
# unreachable (the default client waits 30 s per read and retries), so 5 s to connect, 5 s to answer, 2 tries.
KEEPER_CONNECT_TIMEOUT = 5.0
KEEPER_READ_TIMEOUT = 5.0
KEEPER_ATTEMPTS = 2


class VisibilityKeeper(threading.Thread):
    def __init__(self, settings: Settings, client: SQSClient | None = None) -> None:
        super().__init__(name="samseg-visibility", daemon=True)
        self.timeout = settings.visibility_timeout_seconds
        self.interval = max(2.0, self.timeout / 3)
        self.client = client or sqs_client(
            settings, connect_timeout=KEEPER_CONNECT_TIMEOUT, read_timeout=KEEPER_READ_TIMEOUT, retries=KEEPER_ATTEMPTS
        )
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.wait(self.interval):
            try:
                self.extend_all()
            except Exception as exc:  # never let the keeper die: a missed round is retried next interval
                log.warning("visibility_extend_failed", error=repr(exc))

    def extend_all(self) -> int:
        """Extend every message this worker holds: running, prefetched, and waiting for an ETA/countdown.

        Celery 5.7 keeps a countdown/ETA request (a stage retry waits up to 5 min) in `scheduled_requests`
        until it fires, not in `reserved_requests`; without it such a message reappears after one timeout and
        the stage runs twice or three times.
        """
        from celery.worker import state

        held: dict[str, list[str]] = {}  # queue URL → receipt handles
        for request in held_requests(state):
            message = getattr(request, "message", None)
            info = getattr(message, "delivery_info", None) or {}
            queue_url = info.get("sqs_queue")
            receipt = getattr(message, "delivery_tag", None)
            if not queue_url or not receipt or getattr(message, "acknowledged", False):
                continue
            receipts = held.setdefault(str(queue_url), [])
            if receipt not in receipts:
                receipts.append(str(receipt))
        return sum(self.extend(url, receipts) for url, receipts in held.items())

    def extend(self, queue_url: str, receipts: list[str]) -> int:
        """ChangeMessageVisibilityBatch, ten at a time; returns how many were extended.

        A failed entry is logged and skipped (ReceiptHandleIsInvalid: acknowledged in the meantime); a batch
        call that fails as a whole (throttled, a transient 5xx, an error code meant for one entry) is retried
        one message at a time, so one bad message never costs the others their extension.
        """
        extended = 0
        for first in range(0, len(receipts), BATCH):
            chunk = receipts[first : first + BATCH]
            entries = [
                {"Id": str(i), "ReceiptHandle": r, "VisibilityTimeout": self.timeout} for i, r in enumerate(chunk)
            ]
            try:
                answer = self.client.change_message_visibility_batch(QueueUrl=queue_url, Entries=entries)  # type: ignore[arg-type]
            except (ClientError, BotoCoreError) as exc:
                if isinstance(exc, BotoCoreError):  # SQS unreachable: the next round tries again
                    log.warning("visibility_extend_failed", error=repr(exc), queue_url=queue_url, messages=len(chunk))
                    continue
                log.warning("visibility_batch_failed", error=repr(exc), queue_url=queue_url, messages=len(chunk))
                extended += sum(self.extend_one(queue_url, r) for r in chunk)
                continue
            extended += len(answer.get("Successful", []))
            for failure in answer.get("Failed", []):
                code = failure.get("Code", "")
                if code in ("ReceiptHandleIsInvalid", "MessageNotInflight"):
                    log.debug("visibility_not_extended", code=code, reason="acknowledged or released meanwhile")
                else:
                    log.warning(
                        "visibility_entry_failed", code=code, message=failure.get("Message"), queue_url=queue_url
                    )
        return extended

    def extend_one(self, queue_url: str, receipt: str) -> int:
        try:
            self.client.change_message_visibility(
                QueueUrl=queue_url, ReceiptHandle=receipt, VisibilityTimeout=self.timeout
            )
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code", "")
            if "ReceiptHandleIsInvalid" in code or "MessageNotInflight" in code:
                log.debug("visibility_not_extended", code=code, reason="acknowledged or released meanwhile")
            else:
                log.warning("visibility_entry_failed", code=code, error=repr(exc), queue_url=queue_url)
            return 0
        except BotoCoreError as exc:
            log.warning("visibility_extend_failed", error=repr(exc), queue_url=queue_url, messages=1)
            return 0
        return 1

    def stop(self) -> None:
        self._stop_event.set()


def held_requests(state: Any) -> list[Any]:
    """Every request the worker holds a message for: reserved (running or prefetched), active, scheduled."""
    seen: dict[int, Any] = {}
    sources: Iterable[Any] = (
        getattr(state, "reserved_requests", ()),
        getattr(state, "active_requests", ()),
        getattr(state, "scheduled_requests", ()),
    )
    for source in sources:
        for request in snapshot(source):
            seen.setdefault(id(request), request)
    return list(seen.values())


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
    created by an older samseg with 3600 s, is brought in line by `JobQueues.ensure` at worker start — except
    the jobs queue and its DLQ, which may be the app server's: there it is reported, not changed.)
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
