"""Direct SQS access for what Celery does not do: the app server's jobs queue and its dead-letter queue.

The jobs queue carries plain JSON (the app server is not a Celery client), so creating it, sending to it
and dead-lettering from it go through boto3 here; Celery's own queues are kombu's business.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

import structlog

from samseg.core import aws
from samseg.core.settings import Settings

if TYPE_CHECKING:
    from mypy_boto3_sqs import SQSClient

log = structlog.get_logger(__name__)


def sqs_client(
    settings: Settings, *, connect_timeout: float = 5, read_timeout: float = 30, retries: int = 3
) -> SQSClient:
    # Bounded retries and timeouts: the API must answer (503) rather than hang while SQS is down.
    sqs: SQSClient = aws.client(
        settings,
        "sqs",
        settings.aws_endpoint_url_sqs,
        retries={"max_attempts": retries, "mode": "standard"},
        connect_timeout=connect_timeout,
        read_timeout=read_timeout,
    )
    return sqs


def probe_client(settings: Settings) -> SQSClient:
    """A client for health checks: fails fast (2 s to connect, 3 s to answer, no retries) instead of waiting."""
    return sqs_client(settings, connect_timeout=2, read_timeout=3, retries=0)


class JobQueues:
    """The jobs queue and its DLQ, created on first use with the attributes samseg relies on."""

    def __init__(self, settings: Settings, client: SQSClient | None = None) -> None:
        self.settings = settings
        self.client = client or sqs_client(settings)
        self._urls: dict[str, str] = {}

    def url(self, name: str) -> str:
        if name not in self._urls:
            self._urls[name] = self.client.get_queue_url(QueueName=name)["QueueUrl"]
        return self._urls[name]

    def ensure(self) -> dict[str, str]:
        """Create what is missing: the jobs queue with a redrive policy to its DLQ, and Celery's queues.

        The jobs queue and its DLQ may belong to the app server (it sends to them, its infrastructure may
        create them): an existing one keeps its attributes, and a difference from what samseg would set is
        logged (`jobs_queue_drift`) rather than overwritten. Celery's queues and their DLQs are samseg's own
        and are brought in line.
        """
        s = self.settings
        visibility = str(s.visibility_timeout_seconds)
        dlq_url = self._create_or_keep(s.dead_letter_queue, {"MessageRetentionPeriod": str(14 * 24 * 3600)})
        dlq_arn = self.client.get_queue_attributes(QueueUrl=dlq_url, AttributeNames=["QueueArn"])["Attributes"][
            "QueueArn"
        ]
        redrive = json.dumps({"deadLetterTargetArn": dlq_arn, "maxReceiveCount": str(s.jobs_max_receive_count)})
        jobs_attrs = {"VisibilityTimeout": visibility, "RedrivePolicy": redrive, "ReceiveMessageWaitTimeSeconds": "10"}
        jobs_url = self._create_or_keep(s.jobs_queue, jobs_attrs)
        urls = {s.jobs_queue: jobs_url, s.dead_letter_queue: dlq_url}
        for name, dead_letters in s.task_dead_letter_queues.items():
            # Celery's queues: a task message received SAMSEG_TASK_MAX_RECEIVE_COUNT times without being
            # deleted (its worker died each time) moves to `<queue>-dlq`; samseg.queue.dead_letters reads it back.
            urls[dead_letters] = self._create(dead_letters, {"MessageRetentionPeriod": str(14 * 24 * 3600)})
            task_redrive = json.dumps(
                {"deadLetterTargetArn": self.arn(urls[dead_letters]), "maxReceiveCount": str(s.task_max_receive_count)}
            )
            urls[name] = self._create(name, {"VisibilityTimeout": visibility, "RedrivePolicy": task_redrive})
        return urls

    def arn(self, url: str) -> str:
        attrs = self.client.get_queue_attributes(QueueUrl=url, AttributeNames=["QueueArn"])["Attributes"]
        return attrs["QueueArn"]

    def _create_or_keep(self, name: str, attributes: dict[str, str]) -> str:
        """Create `name` with `attributes` if it does not exist; else leave it as it is and report drift."""
        try:
            url = self.client.get_queue_url(QueueName=name)["QueueUrl"]
        except self.client.exceptions.QueueDoesNotExist:
            return self._create(name, attributes)
        self._urls[name] = url
        answer = self.client.get_queue_attributes(QueueUrl=url, AttributeNames=["All"])
        actual: dict[str, str] = {str(k): v for k, v in answer.get("Attributes", {}).items()}
        for attribute, expected in attributes.items():
            if not _same(attribute, expected, actual.get(attribute)):
                log.warning(
                    "jobs_queue_drift",
                    queue=name,
                    attribute=attribute,
                    expected=expected,
                    actual=actual.get(attribute),
                    action="left as it is (the queue may be the app server's)",
                )
        return url

    def _create(self, name: str, attributes: dict[str, str]) -> str:
        try:
            url = self.client.create_queue(QueueName=name, Attributes=attributes)["QueueUrl"]  # type: ignore[arg-type]
        except self.client.exceptions.QueueNameExists:
            # Exists with other attributes (e.g. a visibility timeout kombu chose): bring it in line.
            url = self.client.get_queue_url(QueueName=name)["QueueUrl"]
            self.client.set_queue_attributes(QueueUrl=url, Attributes=attributes)  # type: ignore[arg-type]
        self._urls[name] = url
        return url

    def send_job(self, body: dict[str, Any]) -> str:
        try:
            url = self.url(self.settings.jobs_queue)
        except self.client.exceptions.QueueDoesNotExist:
            self.ensure()
            url = self.url(self.settings.jobs_queue)
        return self.client.send_message(QueueUrl=url, MessageBody=json.dumps(body))["MessageId"]

    def dead_letter(self, raw_body: str, reason: str, message_id: str | None) -> None:
        """Keep a message samseg cannot run, with the reason, for a human to look at."""
        try:
            url = self.url(self.settings.dead_letter_queue)
        except self.client.exceptions.QueueDoesNotExist:
            self.ensure()
            url = self.url(self.settings.dead_letter_queue)
        self.client.send_message(
            QueueUrl=url,
            MessageBody=raw_body or "<empty body>",
            MessageAttributes={
                "samseg_error": {"DataType": "String", "StringValue": reason[:1000]},
                "samseg_source_message_id": {"DataType": "String", "StringValue": message_id or "unknown"},
            },
        )

    def reachable(self, name: str) -> str:
        """One real SQS call (GetQueueAttributes) on every use: a cached URL alone proves nothing after an outage.

        Meant for a client built by `probe_client` (short timeouts, one attempt), so a readiness probe answers
        within a few seconds while SQS is down or unreachable.
        """
        try:
            attrs = self.client.get_queue_attributes(
                QueueUrl=self.url(name), AttributeNames=["ApproximateNumberOfMessages"]
            )["Attributes"]
        except self.client.exceptions.QueueDoesNotExist:
            self._urls.pop(name, None)  # deleted (or never created): look it up again next time
            raise
        return f"{name} reachable ({attrs.get('ApproximateNumberOfMessages', '?')} messages waiting)"

    def visibility_timeout(self, name: str) -> int:
        attrs = self.client.get_queue_attributes(QueueUrl=self.url(name), AttributeNames=["VisibilityTimeout"])
        return int(attrs["Attributes"]["VisibilityTimeout"])

    def depth(self, name: str) -> int:
        attrs = self.client.get_queue_attributes(
            QueueUrl=self.url(name), AttributeNames=["ApproximateNumberOfMessages"]
        )
        return int(attrs["Attributes"]["ApproximateNumberOfMessages"])


def _same(attribute: str, expected: str, actual: str | None) -> bool:
    if actual is None:
        return False
    if attribute == "RedrivePolicy":  # JSON: maxReceiveCount may come back as a number or a string
        try:
            want, have = json.loads(expected), json.loads(actual)
        except ValueError:
            return False
        return bool(
            want.get("deadLetterTargetArn") == have.get("deadLetterTargetArn")
            and str(want.get("maxReceiveCount")) == str(have.get("maxReceiveCount"))
        )
    return expected == actual
