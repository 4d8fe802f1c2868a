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
from celery import bootsteps
from kombu import Consumer, Queue
from kombu.message import Message
from pydantic import ValidationError

from samseg.contracts import UUID_PATTERN, ErrorInfo, JobMessage, JobState
from samseg.idempotency import Claims, Decision
from samseg.logs import bind_job, unbind_job
from samseg.settings import Settings, get_settings
from samseg.sqs import JobQueues
from samseg.storage import AssetStore

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
        return JobMessage.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'body'}: {e['msg']}" for e in exc.errors())
        raise InvalidJob(f"invalid job: {problems}", uuid) from exc


class IngressHandler:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._queues: JobQueues | None = None
        self.claims = Claims(
            AssetStore(settings.assets_dir).claims_root,
            stale_after_seconds=settings.visibility_timeout_seconds + settings.segment_time_limit_seconds,
        )

    @property
    def queues(self) -> JobQueues:
        if self._queues is None:
            self._queues = JobQueues(self.settings)
        return self._queues

    def __call__(self, body: Any, message: Message) -> None:
        raw = raw_body(body, message)
        message_id = ((message.delivery_info or {}).get("sqs_message") or {}).get("MessageId")
        try:
            job = parse_job(raw)
        except InvalidJob as bad:
            self._reject(bad, raw, message_id, message)
            return
        bind_job(job.uuid, "ingress")
        try:
            self._accept(job, message_id, message)
        except Exception as exc:  # SQS or the job store unreachable: keep the message, it comes back
            log.warning("ingress_publish_failed", error=repr(exc))
            message.requeue()
        finally:
            unbind_job()

    def _accept(self, job: JobMessage, message_id: str | None, message: Message) -> None:
        from samseg.pipeline import build_chain, jobs

        decision, claim = self.claims.decide(job.uuid, message_id, jobs.get(job.uuid))
        if decision is not Decision.RUN:
            log.info("job_duplicate_ignored", decision=decision.value, run_id=claim.run_id, message_id=message_id)
            message.ack()
            return
        jobs.set(job.uuid, JobState.QUEUED, run_id=claim.run_id)
        build_chain(job, claim.run_id).apply_async()
        self.claims.mark_published(job.uuid, claim)
        message.ack()
        log.info("job_accepted", image_url=job.image_url, message_id=message_id, run_id=claim.run_id)

    def _reject(self, bad: InvalidJob, raw: str, message_id: str | None, message: Message) -> None:
        """Dead-letter a message that is not a job; a readable uuid still gets its `failed` callback."""
        from samseg.pipeline import jobs, notify

        bind_job(bad.uuid, "ingress")
        log.error("ingress_rejected", reason=bad.reason, message_id=message_id, body=raw[:300])
        try:
            self.queues.dead_letter(raw, bad.reason, message_id)
            # Never let a malformed copy overwrite a real job that has this uuid.
            if bad.uuid and jobs.get(bad.uuid) is None:
                error = ErrorInfo(code="invalid_job", message=bad.reason)
                jobs.set(bad.uuid, JobState.FAILED, None, error=error)
                notify.apply_async(({"uuid": bad.uuid, "error": error.model_dump()},), task_id=f"{bad.uuid}.notify")
        except Exception as exc:  # SQS down: keep the message, it comes back after a backoff
            log.warning("ingress_dead_letter_failed", error=repr(exc))
            message.requeue()
        else:
            message.ack()
        finally:
            unbind_job()


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

    def get_consumers(self, channel: Any) -> list[Consumer]:
        if not self.enabled:
            return []
        queue = Queue(self.settings.jobs_queue, no_declare=False)
        handler = IngressHandler(self.settings)
        log.info("ingress_consuming", queue=self.settings.jobs_queue)
        # on_message hands over the undecoded message (bodies are parsed by samseg, never by kombu), so a
        # body kombu cannot decode still reaches the handler and is dead-lettered instead of raising.
        return [Consumer(channel, queues=[queue], on_message=lambda message: handler(None, message), accept=None)]
