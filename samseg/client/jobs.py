"""Build a job and send it: on the SQS jobs queue (boto3) or through `POST /jobs` (httpx); cancel it."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

import httpx

from samseg.core.contracts import (
    CancelMessage,
    JobAccepted,
    JobEvent,
    JobMessage,
    JobOptions,
    JobStatus,
    OutputKind,
    ResultDocument,
)

if TYPE_CHECKING:
    from mypy_boto3_sqs import SQSClient


def build_job(
    uuid: str,
    image_url: str,
    *,
    options: JobOptions | Mapping[str, Any] | None = None,
    outputs: Iterable[OutputKind] = (),
    ttl_seconds: int | None = None,
    events: Iterable[JobEvent] = (),
) -> JobMessage:
    """A validated job: raises pydantic's ValidationError naming the field (`options.max_masks`, …)."""
    data: dict[str, Any] = {"uuid": uuid, "image_url": image_url, "outputs": list(outputs), "events": list(events)}
    if options is not None:
        data["options"] = options.model_dump(exclude_none=True) if isinstance(options, JobOptions) else dict(options)
    if ttl_seconds is not None:
        data["ttl_seconds"] = ttl_seconds
    return JobMessage.model_validate(data)


def job_body(job: JobMessage) -> str:
    """The JSON a job travels as: fields left at their defaults are left out, so a job without options is
    `{"uuid": …, "image_url": …}` exactly."""
    return job.model_dump_json(exclude_defaults=True, exclude_none=True)


def cancel_body(uuid: str) -> str:
    return CancelMessage(uuid=uuid, action="cancel").model_dump_json()


class SqsJobs:
    """Jobs through the SQS jobs queue (the app server's usual way in; IAM guards it)."""

    def __init__(self, queue_url: str, sqs: SQSClient | None = None, **client_kwargs: Any) -> None:
        if sqs is None:
            import boto3

            sqs = boto3.client("sqs", **client_kwargs)
        self.queue_url = queue_url
        self.sqs = sqs

    def send(self, job: JobMessage) -> str:
        """Put the job on the queue; returns SQS's MessageId."""
        return self.sqs.send_message(QueueUrl=self.queue_url, MessageBody=job_body(job))["MessageId"]

    def cancel(self, uuid: str) -> str:
        """Put `{"uuid": …, "action": "cancel"}` on the queue; returns SQS's MessageId."""
        return self.sqs.send_message(QueueUrl=self.queue_url, MessageBody=cancel_body(uuid))["MessageId"]


class HttpJobs:
    """Jobs through samseg's API (`SAMSEG_API_TOKEN` as the bearer token)."""

    def __init__(self, base_url: str, token: str, client: httpx.Client | None = None, timeout: float = 30.0) -> None:
        self.client = client or httpx.Client(timeout=timeout)
        self.base_url = base_url.rstrip("/")
        self.headers = {"Authorization": f"Bearer {token}"}

    def submit(self, job: JobMessage) -> JobAccepted:
        """`POST /jobs`: 202 with the status URL; raises httpx.HTTPStatusError otherwise (422 names the field)."""
        response = self.client.post(
            f"{self.base_url}/jobs",
            content=job_body(job).encode(),
            headers={**self.headers, "Content-Type": "application/json"},
        )
        response.raise_for_status()
        return JobAccepted.model_validate(response.json())

    def cancel(self, uuid: str) -> JobStatus:
        """`DELETE /jobs/{uuid}`: the job's status afterwards (`canceled`, or `running` with `cancel_requested`
        while a stage reaches its next boundary). Raises httpx.HTTPStatusError: 409 for a job that already
        ended (the body says its status), 404 for an unknown uuid."""
        response = self.client.delete(f"{self.base_url}/jobs/{uuid}", headers=self.headers)
        response.raise_for_status()
        return JobStatus.model_validate(response.json())

    def status(self, uuid: str) -> JobStatus:
        """`GET /jobs/{uuid}`."""
        response = self.client.get(f"{self.base_url}/jobs/{uuid}", headers=self.headers)
        response.raise_for_status()
        return JobStatus.model_validate(response.json())

    def result(self, result_url: str) -> ResultDocument:
        """result.json (the callback's `result_url`; a path is taken relative to the API)."""
        url = result_url if "://" in result_url else f"{self.base_url}{result_url}"
        response = self.client.get(url, headers=self.headers)
        response.raise_for_status()
        return ResultDocument.model_validate(json.loads(response.content))

    def download(self, asset_url: str) -> bytes:
        """A mask PNG, label map or overlay by its URL (as the callback gives it)."""
        url = asset_url if "://" in asset_url else f"{self.base_url}{asset_url}"
        response = self.client.get(url, headers=self.headers)
        response.raise_for_status()
        return response.content
