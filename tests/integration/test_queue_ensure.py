"""Issue #15 (3g): worker start creates the jobs queue if it is missing, but an existing one (the app server
may own it) keeps its attributes; a difference from samseg's is reported. moto's SQS server.
"""

from __future__ import annotations

import json
import secrets
from unittest import mock

import boto3
from structlog.testing import capture_logs

from samseg.core.settings import Settings
from samseg.queue.sqs import JobQueues


def _settings(moto_url: str, prefix: str) -> Settings:
    env = {
        "AWS_ENDPOINT_URL_SQS": moto_url,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_REGION": "us-east-1",
        "SAMSEG_QUEUE_PREFIX": prefix,
        "SAMSEG_JOBS_QUEUE": f"{prefix}jobs",
    }
    with mock.patch.dict("os.environ", env, clear=True):
        return Settings()


def _attrs(sqs, name: str) -> dict[str, str]:  # type: ignore[no-untyped-def]
    url = sqs.get_queue_url(QueueName=name)["QueueUrl"]
    return sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["All"])["Attributes"]


def _sqs(moto_url: str):  # type: ignore[no-untyped-def]
    return boto3.client(
        "sqs", endpoint_url=moto_url, region_name="us-east-1", aws_access_key_id="t", aws_secret_access_key="t"
    )


def test_an_existing_jobs_queue_keeps_its_attributes_and_the_drift_is_reported(moto_url):
    prefix = f"own{secrets.token_hex(3)}-"
    sqs = _sqs(moto_url)
    # The app server's queue: its own visibility timeout and long-poll setting, no redrive policy.
    sqs.create_queue(QueueName=f"{prefix}jobs", Attributes={"VisibilityTimeout": "45"})
    before = _attrs(sqs, f"{prefix}jobs")
    with capture_logs() as logs:
        JobQueues(_settings(moto_url, prefix)).ensure()
    after = _attrs(sqs, f"{prefix}jobs")
    assert after["VisibilityTimeout"] == "45" and "RedrivePolicy" not in after
    assert {k: v for k, v in after.items() if k != "LastModifiedTimestamp"} == {
        k: v for k, v in before.items() if k != "LastModifiedTimestamp"
    }
    drift = {e["attribute"]: e for e in logs if e["event"] == "jobs_queue_drift"}
    assert set(drift) == {"VisibilityTimeout", "RedrivePolicy", "ReceiveMessageWaitTimeSeconds"}, drift
    assert drift["VisibilityTimeout"]["actual"] == "45" and drift["VisibilityTimeout"]["expected"] == "120"
    # samseg's own queues were still created (and may be brought in line).
    assert _attrs(sqs, f"{prefix}io")["VisibilityTimeout"] == "120"


def test_a_missing_jobs_queue_is_created_with_the_redrive_policy_and_a_second_start_reports_nothing(moto_url):
    prefix = f"new{secrets.token_hex(3)}-"
    sqs = _sqs(moto_url)
    settings = _settings(moto_url, prefix)
    JobQueues(settings).ensure()
    attrs = _attrs(sqs, f"{prefix}jobs")
    policy = json.loads(attrs["RedrivePolicy"])
    assert int(policy["maxReceiveCount"]) == settings.jobs_max_receive_count
    assert policy["deadLetterTargetArn"].endswith(f":{prefix}jobs-dlq")
    assert attrs["VisibilityTimeout"] == "120"
    with capture_logs() as logs:
        JobQueues(settings).ensure()
    assert [e for e in logs if e["event"] == "jobs_queue_drift"] == []
