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
from typing import Any

import structlog
from celery import Celery, bootsteps
from kombu import Consumer, Queue
from kombu.message import Message
from pydantic import ValidationError

from samseg.core.contracts import UUID_PATTERN, ErrorInfo, JobMessage
from samseg.core.logs import bind_job, redact_text, redact_url, unbind_job
from samseg.core.options import not_yet_honoured
from samseg.core.settings import Settings, get_settings
from samseg.queue.sqs import JobQueues
from samseg.stores import Stores, build_stores
from samseg.stores.jobs import PUBLISH_LEASE_SECONDS, Decision
from samseg.worker.chain import build_chain, first_payload, queue_delivery

log = structlog.get_logger(__name__)


class InvalidJob(ValueError):
    def __init__(self, reason: str, uuid: str | None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.uuid = uuid


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


def parse_job(raw: str) -> JobMessage:
    """Validate one ingress body; InvalidJob says why and carries the uuid if one can be trusted."""
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
        job = JobMessage.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'body'}: {e['msg']}" for e in exc.errors())
        raise InvalidJob(f"invalid job: {problems}", uuid) from exc
    unsupported = not_yet_honoured(job)
    if unsupported:
        raise InvalidJob(f"not supported by this samseg version yet: {', '.join(unsupported)}", uuid)
    return job


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
            job = parse_job(raw)
        except InvalidJob as bad:
            self._reject(bad, raw, message_id, message)
            return
        bind_job(job.uuid, "ingress")
        try:
            self._accept(job, message_id, message)
        except Exception as exc:  # SQS or the job store unreachable: keep the message, it comes back later
            receives = int((sqs_message.get("Attributes") or {}).get("ApproximateReceiveCount") or 1)
            delay = retry_delay(receives)
            log.warning("ingress_publish_failed", error=repr(exc), retry_in_seconds=delay, receives=receives)
            self._release(message, delay)
        finally:
            unbind_job()

    def _accept(self, job: JobMessage, message_id: str | None, message: Message) -> None:
        claim = self.stores.jobs.claim(job.uuid, message_id, payload=first_payload(job))
        if claim.decision is Decision.BUSY:
            # The same SQS message is being published by another consumer right now (SQS delivered it twice):
            # look again once that consumer's lease is over, in case it died before publishing.
            log.info("job_delivery_busy", message_id=message_id, run_id=claim.record.run_id)
            self._release(message, int(PUBLISH_LEASE_SECONDS))
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
        build_chain(self.app, job, claim.run_id).apply_async()
        self.stores.jobs.mark_published(job.uuid, claim.run_id)
        message.ack()
        log.info("job_accepted", image_url=redact_url(job.image_url), message_id=message_id, run_id=claim.run_id)

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
            error = ErrorInfo(code="invalid_job", message=bad.reason)
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
