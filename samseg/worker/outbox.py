"""The callback outbox's worker side: one task per attempt (`samseg.deliver_callback`), never sleeping in a slot.

An attempt takes the run's send marker (Lifecycle.begin_send: one CAS, so two attempts never both send), PATCHes
the run's fixed body once — result.json for a completed run (written once by persist, mask URLs included), the
error for a failed one — with the run's `webhook-id` and a fresh signature, and records the outcome
(Lifecycle.record_attempt). A retry is the same task published again with a countdown (capped, and re-checked
on arrival, so a long backoff never holds a message past its visibility); if that message is lost, the
sweeper queues another. Attempts go on until the app server accepts (2xx), answers 410 (gone) or another 4xx
(rejected), or SAMSEG_CALLBACK_HORIZON_SECONDS / SAMSEG_CALLBACK_MAX_ATTEMPTS is spent (expired).
"""

from __future__ import annotations

import time

import structlog
from celery import shared_task

from samseg.core.contracts import CallbackBody, JobState, OutboxState
from samseg.ops import metrics
from samseg.stores.lifecycle import AttemptResult
from samseg.transfer.callbacks import attempt_callback, webhook_id_for
from samseg.worker import chain as names
from samseg.worker.base import StageTask

log = structlog.get_logger(__name__)

# A retry's countdown is capped so the message never waits in a worker longer than this; it is re-checked on
# arrival and re-published while not yet due.
MAX_COUNTDOWN_SECONDS = 300.0


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
            due = box.sending_until  # another attempt holds the marker (its worker may have died): look again then
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
    outbox = lifecycle.record_attempt(ticket, result)
    if outbox is None:
        log.warning("callback_marker_lost", run_id=run_id, attempt=ticket.attempt)
        return "lost_marker"
    log.info(
        "callback_attempt",
        run_id=run_id,
        attempt=outbox.attempts,
        outbox=outbox.state.value if outbox.state else None,
        http_status=attempt.http_status,
        error=attempt.error,
        next_attempt_at=outbox.next_attempt_at,
    )
    if outbox.state is OutboxState.PENDING and outbox.next_attempt_at is not None:
        wait = min(MAX_COUNTDOWN_SECONDS, max(0.0, outbox.next_attempt_at - time.time()))
        names.queue_delivery(self.app, uuid, run_id, countdown=wait)
    elif outbox.state is not None:
        metrics.instruments().callbacks.labels("delivered" if outbox.delivered else outbox.state.value).inc()
    return outbox.state.value if outbox.state else "unknown"
