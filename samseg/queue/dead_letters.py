"""Celery task messages that SQS dead-lettered: read them back and say which job they belonged to.

Celery's io and gpu queues have a redrive policy (`SAMSEG_TASK_MAX_RECEIVE_COUNT`, see `JobQueues.ensure`): a
task message received that many times without being deleted — its worker died every time, e.g. the kernel's
OOM killer on one huge image — moves to `<queue>-dlq` instead of being redelivered forever. Its job must then
still end (failed, `worker_lost`); this module gives the consumer that does it what it needs.

Wire format (kombu 5.7 SQS transport, Celery task protocol 2, JSON serializer), checked against messages a
real Celery app sent to moto (tests/test_dead_letters.py):

    SQS Body    = base64( JSON envelope )                  (transport option sqs_base64_encoding, default on)
    envelope    = {"body": base64(payload), "headers": {"task": name, "id": task id, ...},
                   "properties": {"body_encoding": "base64", ...}, "content-type": "application/json", ...}
    payload     = JSON [args, kwargs, embed]               (embed: callbacks, errbacks, chain, chord)

samseg's stage tasks take the job dict as args[0] (`{"uuid", "run_id", ...}`). Protocol 1 (the task fields in
the payload itself) and un-encoded bodies are read too, so a message from an older client still names its job.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import structlog

from samseg.core.contracts import UUID_PATTERN

if TYPE_CHECKING:
    from mypy_boto3_sqs import SQSClient

    from samseg.queue.sqs import JobQueues

log = structlog.get_logger(__name__)


class NotATaskMessage(ValueError):
    """The body is not a Celery task message samseg can read."""


@dataclass(frozen=True)
class DeadTask:
    """What a dead-lettered task message says about itself."""

    task: str  # e.g. "samseg.segment"
    task_id: str  # samseg names them "{uuid}.{stage}"
    args: list[Any]
    kwargs: dict[str, Any]
    job: dict[str, Any] | None  # args[0] when it is a dict (samseg's stage tasks)

    @property
    def job_uuid(self) -> str | None:
        """The job's uuid from args[0], else from samseg's task id convention; None if neither is valid."""
        candidates = [self.job.get("uuid") if self.job else None, self.task_id.rsplit(".", 1)[0]]
        for value in candidates:
            if isinstance(value, str) and UUID_PATTERN.fullmatch(value):
                return value
        return None

    @property
    def run_id(self) -> str | None:
        value = self.job.get("run_id") if self.job else None
        return value if isinstance(value, str) else None


def parse_task_message(body: str) -> DeadTask:
    """Decode an SQS body that kombu's SQS transport wrote for a Celery task. Raises NotATaskMessage."""
    envelope = _json_object(body)
    if envelope is None:
        raise NotATaskMessage("body is neither JSON nor base64 of JSON")
    headers = envelope.get("headers")
    if isinstance(headers, dict) and "task" in headers:  # protocol 2
        payload = envelope.get("body")
        if not isinstance(payload, str):
            raise NotATaskMessage("envelope has no body")
        encoding = (envelope.get("properties") or {}).get("body_encoding")
        raw = _b64(payload) if encoding == "base64" else payload.encode()
        if raw is None:
            raise NotATaskMessage("envelope body is not valid base64")
        try:
            decoded = json.loads(raw)
        except (UnicodeDecodeError, ValueError) as exc:
            raise NotATaskMessage(f"task payload is not JSON: {exc}") from exc
        if not (isinstance(decoded, list) and len(decoded) == 3):
            raise NotATaskMessage("task payload is not an [args, kwargs, embed] list")
        args, kwargs, _embed = decoded
        name, task_id = headers.get("task"), headers.get("id")
    elif "task" in envelope and "id" in envelope:  # protocol 1: the fields are the payload
        name, task_id = envelope["task"], envelope["id"]
        args, kwargs = envelope.get("args", []), envelope.get("kwargs", {})
    else:
        raise NotATaskMessage("no task headers")
    if not isinstance(name, str) or not isinstance(task_id, str):
        raise NotATaskMessage("task name or id missing")
    if not isinstance(args, list) or not isinstance(kwargs, dict):
        raise NotATaskMessage("args/kwargs have the wrong types")
    job = args[0] if args and isinstance(args[0], dict) else None
    return DeadTask(task=name, task_id=task_id, args=args, kwargs=kwargs, job=job)


def _b64(text: str) -> bytes | None:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        return None


def _json_object(body: str) -> dict[str, Any] | None:
    for candidate in (body.encode(), _b64(body.strip())):
        if candidate is None:
            continue
        try:
            value = json.loads(candidate)
        except (UnicodeDecodeError, ValueError):
            continue
        if isinstance(value, dict):
            return value
    return None


@dataclass(frozen=True)
class DeadLetter:
    """One message received from a task dead-letter queue: the parsed task (or why it is unreadable)."""

    queue_url: str
    message_id: str
    receipt_handle: str
    receive_count: int
    body: str
    task: DeadTask | None
    error: str | None


def receive(
    client: SQSClient, queue_url: str, max_messages: int = 10, wait_seconds: int = 0, visibility_timeout: int = 60
) -> list[DeadLetter]:
    """Receive (not delete) up to `max_messages` dead-lettered task messages and parse each."""
    response = client.receive_message(
        QueueUrl=queue_url,
        MaxNumberOfMessages=max(1, min(10, max_messages)),
        WaitTimeSeconds=wait_seconds,
        VisibilityTimeout=visibility_timeout,
        AttributeNames=["ApproximateReceiveCount"],
    )
    out = []
    for message in response.get("Messages", []):
        body = message.get("Body", "")
        task: DeadTask | None = None
        error: str | None = None
        try:
            task = parse_task_message(body)
        except NotATaskMessage as exc:
            error = str(exc)
        out.append(
            DeadLetter(
                queue_url=queue_url,
                message_id=message["MessageId"],
                receipt_handle=message["ReceiptHandle"],
                receive_count=int(message.get("Attributes", {}).get("ApproximateReceiveCount", "0")),
                body=body,
                task=task,
                error=error,
            )
        )
    return out


def delete(client: SQSClient, letter: DeadLetter) -> None:
    client.delete_message(QueueUrl=letter.queue_url, ReceiptHandle=letter.receipt_handle)


def reap_once(client: SQSClient, queue_url: str, handle: Callable[[DeadLetter], bool], max_messages: int = 10) -> int:
    """Receive one batch, call `handle` on each, delete those it returns True for; returns how many deleted.

    `handle` is where the job gets its terminal outcome (e.g. failed with `worker_lost` and its callback). A
    handler that raises or returns False leaves the message: it comes back after the visibility timeout, so
    a job store or callback outage never loses it. Unreadable bodies reach `handle` with `task=None`.
    """
    deleted = 0
    for letter in receive(client, queue_url, max_messages=max_messages):
        try:
            done = handle(letter)
        except Exception as exc:
            log.warning("dead_task_handler_failed", message_id=letter.message_id, error=repr(exc))
            continue
        if done:
            delete(client, letter)
            deleted += 1
    return deleted


def reap_task_dead_letters(queues: JobQueues, handle: Callable[[DeadLetter], bool], max_messages: int = 10) -> int:
    """`reap_once` on every task dead-letter queue (io, gpu) of `queues.settings`; returns how many deleted.

    Meant to run periodically (a beat task on the io queue, or a thread of the io worker's main process).
    """
    deleted = 0
    for dead_letters in queues.settings.task_dead_letter_queues.values():
        deleted += reap_once(queues.client, queues.url(dead_letters), handle, max_messages=max_messages)
    return deleted
