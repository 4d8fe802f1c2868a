"""The callback outbox's worker side: one task per attempt (`samseg.deliver_callback`), never sleeping in a slot.

An attempt takes the run's send marker (Lifecycle.begin_send: one CAS, so two attempts never both send), PATCHes
the run's fixed body once — result.json for a completed run (written once by persist, mask URLs included), the
error for a failed one — with the run's `webhook-id` and a fresh signature, and records the outcome
(Lifecycle.record_attempt). A retry is the same task published again with a countdown (capped, and re-checked
on arrival, so a long backoff never holds a message past its visibility); if that message is lost, the
sweeper queues another. Attempts go on until the app server accepts (2xx), answers 410 (gone) or another 4xx
(rejected), or SAMSEG_CALLBACK_HORIZON_SECONDS / SAMSEG_CALLBACK_MAX_ATTEMPTS is spent (expired).

An answer the job store cannot take when it comes (an outage right after the PATCH) is not dropped: only this
process knows it, so one thread per process (UnrecordedAttempts) records it every RECORD_RETRY_SECONDS until the
store takes it. Another attempt takes a stale marker over only SEND_RECLAIM_SECONDS after first seeing it stale
(samseg.stores.lifecycle), so the app server does not get a delivered callback again because of an outage.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass

import structlog
from celery import Celery, shared_task

from samseg.core.contracts import CallbackBody, CallbackStatus, JobState, OutboxState
from samseg.core.errors import is_transient
from samseg.ops import metrics
from samseg.stores.lifecycle import SEND_RECLAIM_SECONDS, AttemptResult, Lifecycle, SendTicket
from samseg.transfer.callbacks import attempt_callback, webhook_id_for
from samseg.worker import chain as names
from samseg.worker.base import StageTask

log = structlog.get_logger(__name__)

# A retry's countdown is capped so the message never waits in a worker longer than this; it is re-checked on
# arrival and re-published while not yet due.
MAX_COUNTDOWN_SECONDS = 300.0
# How often an answer the job store could not take is offered to it again: well inside SEND_RECLAIM_SECONDS,
# so a live holder records before another attempt may take its marker over.
RECORD_RETRY_SECONDS = SEND_RECLAIM_SECONDS / 15


@shared_task(name=names.DELIVER_CALLBACK, bind=True, base=StageTask)
def deliver_callback(self: StageTask, uuid: str, run_id: str) -> str:
    """One attempt of the run's callback, if one is due; what the outbox says afterwards."""
    lifecycle = self.lifecycle
    ticket = lifecycle.begin_send(uuid, run_id)
    if ticket is None:
        record = self.stores.jobs.get(uuid)
        box = record.callback if record is not None and record.run_id == run_id else None
        due = None
        if box is not None and box.state is OutboxState.PENDING:
            due = box.next_attempt_at  # an early message (a capped countdown): wait again
        elif box is not None and box.state is OutboxState.SENDING:
            # Another attempt holds the marker (its worker may have died): look again when it may be taken over.
            due = box.reclaim_at or box.sending_until
        if due is not None and due - time.time() > -1:
            names.queue_delivery(
                self.app, uuid, run_id, countdown=min(max(1.0, due - time.time() + 1), MAX_COUNTDOWN_SECONDS)
            )
            return "waiting"
        return box.state.value if box is not None and box.state is not None else "nothing_due"
    if ticket.status is JobState.COMPLETED:
        data = self.stores.assets.read_result(uuid)
        if data is None:
            result = AttemptResult(False, error="result.json is gone (purged before delivery)", give_up=True)
            outbox = lifecycle.record_attempt(ticket, result)
            log.error("callback_body_missing", run_id=run_id)
            return outbox.state.value if outbox is not None and outbox.state else "lost_marker"
        body = CallbackBody.model_validate(data)  # result.json: its rle/polygons/params stay out of the PATCH
    elif ticket.status is JobState.CANCELED:
        body = CallbackBody(uuid=uuid, status="canceled", segments=[])
    else:
        body = CallbackBody(uuid=uuid, status="failed", segments=[], error=ticket.error)
    attempt = attempt_callback(body, self.settings, webhook_id=webhook_id_for(uuid, run_id))
    result = AttemptResult(attempt.delivered, attempt.http_status, attempt.error, attempt.retry_after)
    try:
        outbox = lifecycle.record_attempt(ticket, result)
    except Exception as exc:
        if not is_transient(exc):
            raise
        # The app server has answered; the store is unreachable. Retrying this task would send again once the
        # marker runs out: keep the answer in this process and record it as soon as the store is back.
        UnrecordedAttempts.for_process(lifecycle, self.app).add(ticket, result)
        log.warning(
            "callback_outcome_unrecorded",
            run_id=run_id,
            attempt=ticket.attempt,
            http_status=attempt.http_status,
            error=repr(exc)[:300],
        )
        return "recording"
    return recorded(self.app, ticket, result, outbox)


def recorded(app: Celery, ticket: SendTicket, result: AttemptResult, outbox: CallbackStatus | None) -> str:
    """After an attempt's outcome was recorded: log it, and queue the next attempt if one is due."""
    if outbox is None:
        log.warning("callback_marker_lost", job_uuid=ticket.uuid, run_id=ticket.run_id, attempt=ticket.attempt)
        return "lost_marker"
    log.info(
        "callback_attempt",
        job_uuid=ticket.uuid,
        run_id=ticket.run_id,
        attempt=outbox.attempts,
        outbox=outbox.state.value if outbox.state else None,
        http_status=result.http_status,
        error=result.error,
        next_attempt_at=outbox.next_attempt_at,
    )
    if outbox.state is OutboxState.PENDING and outbox.next_attempt_at is not None:
        wait = min(MAX_COUNTDOWN_SECONDS, max(0.0, outbox.next_attempt_at - time.time()))
        names.queue_delivery(app, ticket.uuid, ticket.run_id, countdown=wait)
    elif outbox.state is not None:
        metrics.instruments().callbacks.labels("delivered" if outbox.delivered else outbox.state.value).inc()
    return outbox.state.value if outbox.state else "unknown"


@dataclass(frozen=True)
class Unrecorded:
    ticket: SendTicket
    result: AttemptResult
    since: float


class UnrecordedAttempts:
    """Per process (re-created after a fork): attempt outcomes the job store could not take when they came, and
    the thread that offers them to it every RECORD_RETRY_SECONDS until it does.

    An outcome leaves when it is recorded, when its marker turns out to be taken over (the store was unreachable
    to this process for the whole reclaim window: the other attempt sends, as for a dead holder), or on a
    non-transient error. Kept in memory only: a process that ends first leaves the marker to run out, the case
    docs/operations.md names ("What the app server may receive twice").
    """

    _instance: tuple[int, UnrecordedAttempts] | None = None
    _instance_lock = threading.Lock()

    def __init__(self, lifecycle: Lifecycle, app: Celery, interval: float = RECORD_RETRY_SECONDS) -> None:
        self.lifecycle = lifecycle
        self.app = app
        self.interval = interval
        self._pending: dict[tuple[str, str, int], Unrecorded] = {}
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="samseg-unrecorded", daemon=True)
        self._thread.start()

    @classmethod
    def for_process(cls, lifecycle: Lifecycle, app: Celery) -> UnrecordedAttempts:
        with cls._instance_lock:
            cached = cls._instance
            if cached is None or cached[0] != os.getpid():
                cached = cls._instance = (os.getpid(), cls(lifecycle, app))
            return cached[1]

    def add(self, ticket: SendTicket, result: AttemptResult) -> None:
        with self._lock:
            self._pending[(ticket.uuid, ticket.run_id, ticket.attempt)] = Unrecorded(ticket, result, time.time())

    def pending(self) -> int:
        with self._lock:
            return len(self._pending)

    def record_all(self) -> int:
        """Offer every pending outcome to the store once; how many left the list."""
        with self._lock:
            items = list(self._pending.items())
        done = 0
        for key, item in items:
            try:
                outbox = self.lifecycle.record_attempt(item.ticket, item.result)
            except Exception as exc:
                if is_transient(exc):
                    continue  # still unreachable: next round
                log.error("callback_outcome_record_failed", job_uuid=item.ticket.uuid, error=repr(exc)[:300])
                outbox = None
            else:
                log.info(
                    "callback_outcome_recorded_late",
                    job_uuid=item.ticket.uuid,
                    run_id=item.ticket.run_id,
                    waited_seconds=round(time.time() - item.since, 1),
                    marker_lost=outbox is None,
                )
                try:
                    recorded(self.app, item.ticket, item.result, outbox)
                except Exception as exc:  # a lost publish of the next attempt: the sweeper queues it
                    log.warning("callback_next_attempt_not_queued", job_uuid=item.ticket.uuid, error=repr(exc)[:300])
            with self._lock:
                self._pending.pop(key, None)
            done += 1
        return done

    def _run(self) -> None:
        while True:
            time.sleep(self.interval)
            self.record_all()
