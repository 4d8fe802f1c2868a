"""The raw-JSON door: a worker consumer on SAMSEG_JOBS_QUEUE that turns app-server messages into chains.

The app server is not a Celery client, so its messages are plain JSON. kombu hands them over wrapped,
and treats a body with a top-level `properties` key as its own envelope, so the handler parses the
untouched SQS body from `delivery_info["sqs_message"]["Body"]`.

A message is acknowledged only after its chain was published (or it was dead-lettered): a crash in
between leaves it on SQS to be redelivered. Messages that are not jobs go to the dead-letter queue with
the reason; if a safe uuid can still be read from them, that job also gets a `failed` callback.
"""

from __future__ import annotations

import json
import time
from typing import Any

import structlog
from celery import Celery, bootsteps
from kombu import Consumer, Queue
from kombu.message import Message
from pydantic import ValidationError

from samseg.core.contracts import UUID_PATTERN, CancelMessage, ErrorInfo, JobMessage, parse_message
from samseg.core.logs import bind_job, redact_text, redact_url, unbind_job
from samseg.core.options import fingerprint, job_deadline
from samseg.core.settings import Settings, get_settings
from samseg.queue.sqs import JobQueues
from samseg.stores import Stores, build_stores
from samseg.stores.jobs import PUBLISH_LEASE_SECONDS, Decision
from samseg.stores.lifecycle import CancelOutcome, Lifecycle
from samseg.worker.chain import build_chain, first_payload, queue_delivery

log = structlog.get_logger(__name__)


# The job message's optional fields: a message whose only problems are in these fails `invalid_options`.
OPTION_FIELDS = frozenset({"options", "outputs", "ttl_seconds", "events"})
# A cancel for a uuid with no record may have overtaken its job (a standard SQS queue does not keep order):
# it is handed back this many times, a minute apart, before it is dead-lettered.
CANCEL_UNKNOWN_RECEIVES = 3
CANCEL_UNKNOWN_DELAY = 60


class InvalidJob(ValueError):
    def __init__(self, reason: str, uuid: str | None, code: str = "invalid_job") -> None:
        super().__init__(reason)
        self.reason = reason
        self.uuid = uuid
        self.code = code


def raw_body(body: Any, message: Message) -> str:
    sqs_message = (message.delivery_info or {}).get("sqs_message") or {}
    raw = sqs_message.get("Body")
    if isinstance(raw, str):
        return raw
    if body is None:
        body = message.body
    if isinstance(body, bytes):
        return body.decode("utf-8", errors="replace")
    return body if isinstance(body, str) else json.dumps(body)


def parse_job(raw: str, max_points_per_side: int | None = None) -> JobMessage | CancelMessage:
    """Validate one ingress body (a job, or a cancel); InvalidJob says why and carries the uuid if one can be
    trusted. Errors only in the optional fields (`options`, `outputs`, `ttl_seconds`, `events`, or more points
    per side than this server allows) are `invalid_options`; the message names each field."""
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InvalidJob(f"body is not JSON: {exc.msg if hasattr(exc, 'msg') else exc}", None) from exc
    except RecursionError:
        raise InvalidJob("body is JSON nested too deeply", None) from None
    if not isinstance(data, dict):
        raise InvalidJob(f"body is JSON {type(data).__name__}, not an object", None)
    candidate = data.get("uuid")
    uuid = candidate if isinstance(candidate, str) and UUID_PATTERN.fullmatch(candidate) else None
    try:
        return parse_message(data, max_points_per_side=max_points_per_side)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'body'}: {e['msg']}" for e in exc.errors())
        if "action" in data:
            raise InvalidJob(f"invalid cancel: {problems}", None) from exc
        only_options = all(e["loc"] and e["loc"][0] in OPTION_FIELDS for e in exc.errors())
        if only_options:
            raise InvalidJob(f"invalid options: {problems}", uuid, "invalid_options") from exc
        raise InvalidJob(f"invalid job: {problems}", uuid) from exc


class IngressHandler:
    """Turns one jobs-queue message into a published chain (or a dead letter), then acknowledges it."""

    def __init__(self, app: Celery, settings: Settings, stores: Stores, queues: JobQueues) -> None:
        self.app = app
        self.settings = settings
        self.stores = stores
        self.queues = queues

    def __call__(self, message: Message) -> None:
        raw = raw_body(None, message)
        sqs_message = (message.delivery_info or {}).get("sqs_message") or {}
        message_id = sqs_message.get("MessageId")
        try:
            job = parse_job(raw, self.settings.job_max_points_per_side)
        except InvalidJob as bad:
            self._reject(bad, raw, message_id, message)
            return
        bind_job(job.uuid, "ingress")
        try:
            if isinstance(job, CancelMessage):
                self._cancel(job, raw, sqs_message, message)
            else:
                self._accept(job, sent_at(sqs_message), message_id, raw, message)
        except Exception as exc:  # SQS or the job store unreachable: keep the message, it comes back later
            receives = int((sqs_message.get("Attributes") or {}).get("ApproximateReceiveCount") or 1)
            delay = retry_delay(receives)
            log.warning("ingress_publish_failed", error=repr(exc), retry_in_seconds=delay, receives=receives)
            self._release(message, delay)
        finally:
            unbind_job()

    def _accept(self, job: JobMessage, sent: float, message_id: str | None, raw: str, message: Message) -> None:
        deadline = job_deadline(job, sent, self.settings)
        claim = self.stores.jobs.claim(
            job.uuid, message_id, payload=first_payload(job, deadline), fingerprint=fingerprint(job)
        )
        if claim.decision is Decision.BUSY:
            # The same SQS message is being published by another consumer right now (SQS delivered it twice):
            # look again once that consumer's lease is over, in case it died before publishing.
            log.info("job_delivery_busy", message_id=message_id, run_id=claim.record.run_id)
            self._release(message, int(PUBLISH_LEASE_SECONDS))
            return
        if claim.decision is Decision.CONFLICT:
            # Another body for a uuid whose run is active: kept for a human, the active run untouched.
            state = claim.record.status.value
            reason = f"uuid_conflict: job {job.uuid} is {state} with another image_url/options/outputs"
            log.warning("job_uuid_conflict", run_id=claim.record.run_id, message_id=message_id)
            self.queues.dead_letter(raw, reason, message_id)
            message.ack()
            return
        if claim.decision is Decision.REDELIVER:
            # The same job again after it completed: the same callback (body and webhook-id), no model run.
            assert claim.record.run_id is not None
            queue_delivery(self.app, job.uuid, claim.record.run_id)
            log.info("job_callback_redelivered", run_id=claim.record.run_id, message_id=message_id)
            message.ack()
            return
        if claim.decision is not Decision.RUN:
            log.info(
                "job_duplicate_ignored",
                decision=claim.decision.value,
                run_id=claim.record.run_id,
                message_id=message_id,
            )
            message.ack()
            return
        build_chain(self.app, job, claim.run_id, deadline).apply_async()
        self.stores.jobs.mark_published(job.uuid, claim.run_id)
        message.ack()
        log.info("job_accepted", image_url=redact_url(job.image_url), message_id=message_id, run_id=claim.run_id)

    def _cancel(self, cancel: CancelMessage, raw: str, sqs_message: dict[str, Any], message: Message) -> None:
        """A cancel message: the same conditional write as DELETE /jobs/{uuid} (Lifecycle.cancel)."""
        outcome, record = Lifecycle(self.stores.jobs, self.settings).cancel(cancel.uuid)
        if outcome is CancelOutcome.UNKNOWN:
            receives = int((sqs_message.get("Attributes") or {}).get("ApproximateReceiveCount") or 1)
            if receives < CANCEL_UNKNOWN_RECEIVES:
                log.info("cancel_before_its_job", receives=receives, retry_in_seconds=CANCEL_UNKNOWN_DELAY)
                self._release(message, CANCEL_UNKNOWN_DELAY)
                return
            reason = f"cancel_unknown_job: no job {cancel.uuid} after {receives} receives"
            self.queues.dead_letter(raw, reason, sqs_message.get("MessageId"))
            log.warning("cancel_unknown_job", receives=receives)
        elif record is not None and record.run_id is not None and record.callback is not None and record.callback.open:
            # Ended now (or already canceled by DELETE /jobs, which sends this message to get the callback going).
            queue_delivery(self.app, cancel.uuid, record.run_id)
        log.info("job_cancel", outcome=outcome.value, status=record.status.value if record else None)
        message.ack()

    def _release(self, message: Message, delay: int) -> None:
        """Hand the message back to SQS, visible again after `delay` seconds (not after its visibility timeout).

        One ChangeMessageVisibility with the delay, then the message is forgotten locally (its prefetch slot
        freed; nothing is deleted). kombu's `message.requeue()` is not used: on SQS it pops `sqs_queue` and
        `sqs_message` from delivery_info and shows the message again after the poll wait (~10 s), so a later
        visibility change could not find the queue and the backoff never reached SQS. If SQS is unreachable,
        the message reappears when its visibility timeout runs out — later, never sooner.
        """
        info = message.delivery_info or {}
        queue_url = info.get("sqs_queue")
        receipt = (info.get("sqs_message") or {}).get("ReceiptHandle") or message.delivery_tag
        try:
            if not queue_url or not receipt:
                raise LookupError("no SQS queue URL or receipt handle in delivery_info")
            self.queues.client.change_message_visibility(
                QueueUrl=queue_url, ReceiptHandle=receipt, VisibilityTimeout=min(43200, max(0, int(delay)))
            )
        except Exception as exc:
            log.warning("ingress_delay_not_set", error=repr(exc), consequence="back after its visibility timeout")
        try:
            message.channel.qos.reject(message.delivery_tag, requeue=False)  # forget it locally; SQS keeps it
        except Exception as exc:
            log.warning("ingress_release_failed", error=repr(exc))

    def _reject(self, bad: InvalidJob, raw: str, message_id: str | None, message: Message) -> None:
        """Dead-letter a message that is not a job; a readable uuid still gets its `failed` callback."""
        bind_job(bad.uuid, "ingress")
        log.error("ingress_rejected", reason=bad.reason, message_id=message_id, body=redact_text(raw[:300]))
        try:
            self.queues.dead_letter(raw, bad.reason, message_id)
            # A failed run of its own, only if the uuid has no record: a malformed copy never touches a real job.
            error = ErrorInfo(code=bad.code, message=bad.reason)
            record = self.stores.jobs.record_invalid(bad.uuid, error) if bad.uuid else None
            if record is not None and record.run_id:
                queue_delivery(self.app, record.uuid, record.run_id)
        except Exception as exc:  # SQS down: keep the message, it comes back after a backoff
            log.warning("ingress_dead_letter_failed", error=repr(exc))
            self._release(message, retry_delay(1))
        else:
            message.ack()
        finally:
            unbind_job()


def sent_at(sqs_message: dict[str, Any]) -> float:
    """When the app server sent the message (SQS SentTimestamp, ms), the start of its `ttl_seconds`; now if SQS
    did not say (a deadline then counts from receipt: later, never sooner)."""
    stamp = (sqs_message.get("Attributes") or {}).get("SentTimestamp")
    try:
        return int(stamp) / 1000.0 if stamp is not None else time.time()
    except (TypeError, ValueError):
        return time.time()


def retry_delay(receives: int) -> int:
    """Seconds until a message that could not be published is tried again: 15 s doubling to 15 min.

    Exponential so that SQS's maxReceiveCount (SAMSEG_JOBS_MAX_RECEIVE_COUNT) spans minutes of outage
    rather than seconds: the default 5 receives cover about 8 minutes.
    """
    return int(min(900, 15 * 2 ** max(0, receives - 1)))


class IngressStep(bootsteps.ConsumerStep):  # type: ignore[misc]
    """Consumes the jobs queue in workers started without -Q, or with the jobs queue named in -Q."""

    def __init__(self, parent: Any, **kwargs: Any) -> None:
        super().__init__(parent, **kwargs)
        settings = get_settings()
        queues = parent.app.amqp.queues
        selected = queues._consume_from  # None: no -Q was given
        self.enabled = selected is None or settings.jobs_queue in selected
        if selected is not None and settings.jobs_queue in selected:
            # Named in -Q only to switch ingress on: Celery's task consumer must not read raw JSON.
            queues.deselect([settings.jobs_queue])
        self.settings = settings
        self.app = parent.app

    def get_consumers(self, channel: Any) -> list[Consumer]:
        if not self.enabled:
            return []
        queue = Queue(self.settings.jobs_queue, no_declare=False)
        handler = IngressHandler(self.app, self.settings, build_stores(self.settings), JobQueues(self.settings))
        log.info("ingress_consuming", queue=self.settings.jobs_queue)
        # on_message hands over the undecoded message (bodies are parsed by samseg, never by kombu), so a
        # body kombu cannot decode still reaches the handler and is dead-lettered instead of raising.
        return [Consumer(channel, queues=[queue], on_message=handler, accept=None)]
