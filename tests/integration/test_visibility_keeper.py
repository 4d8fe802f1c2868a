"""Issue #15 (2): a retried stage never outlives an unextended visibility timeout.

Stage retries are Celery countdowns (up to 300 s) and Celery 5.7 keeps such a request in
`state.scheduled_requests` until it fires; a keeper that extended only `reserved_requests` let SQS deliver it
again after one visibility timeout, so after a long outage each retried stage ran two or three times.
"""

from __future__ import annotations

import subprocess
import sys
from typing import Any
from unittest import mock

import boto3
import pytest
from botocore.exceptions import ClientError

from samseg.core.settings import Settings
from samseg.queue.visibility import VisibilityKeeper
from tests.faults_support import events, wait_until

VISIBILITY = 30  # the smallest SAMSEG_VISIBILITY_TIMEOUT_SECONDS allowed
COUNTDOWN = 3 * VISIBILITY


def _received(worker: Any, name: str) -> int:
    return sum(
        1 for e in events(worker) if str(e.get("event", "")).startswith(f"Task {name}[") and "received" in e["event"]
    )


def test_a_countdown_three_times_the_visibility_timeout_is_delivered_once(make_stack):
    stack = make_stack(SAMSEG_VISIBILITY_TIMEOUT_SECONDS=str(VISIBILITY), SAMSEG_SEGMENT_TIME_LIMIT_SECONDS="60")
    prefix = stack.env["SAMSEG_QUEUE_PREFIX"]
    worker = stack.start_worker("-Q", f"{prefix}io", "-c", "1", name="io")
    # A harmless task (the purge, on an empty stack) sent the way a stage retry is: with a countdown.
    send = f"import samseg; samseg.app.send_task('samseg.purge', countdown={COUNTDOWN}, queue='{prefix}io')"
    subprocess.run([sys.executable, "-c", send], env=stack.env, check=True, timeout=60)
    wait_until(
        lambda: "samseg.purge[" in worker.output() and "succeeded" in worker.output(), COUNTDOWN + 60, "the task"
    )
    assert _received(worker, "samseg.purge") == 1, [e["event"] for e in events(worker) if "samseg.purge" in str(e)]
    client = stack.sqs()
    url = client.get_queue_url(QueueName=f"{prefix}io")["QueueUrl"]
    attrs = client.get_queue_attributes(QueueUrl=url, AttributeNames=["VisibilityTimeout"])["Attributes"]
    assert attrs["VisibilityTimeout"] == str(VISIBILITY)  # the timeout really was 3 times shorter than the wait


@pytest.fixture
def sqs(moto_url: str) -> Any:
    return boto3.client(
        "sqs",
        endpoint_url=moto_url,
        region_name="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )


def _keeper(moto_url: str) -> VisibilityKeeper:
    env = {
        "AWS_ENDPOINT_URL_SQS": moto_url,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_REGION": "us-east-1",
        "SAMSEG_VISIBILITY_TIMEOUT_SECONDS": str(VISIBILITY),
    }
    with mock.patch.dict("os.environ", env, clear=True):
        return VisibilityKeeper(Settings())


def _receive(sqs: Any, url: str, count: int, visibility: int) -> list[tuple[str, str]]:
    handles: list[tuple[str, str]] = []
    while len(handles) < count:
        got = sqs.receive_message(
            QueueUrl=url, MaxNumberOfMessages=min(10, count - len(handles)), VisibilityTimeout=visibility
        )
        handles += [(m["ReceiptHandle"], m["Body"]) for m in got.get("Messages", [])]
    return handles


def test_the_batch_extension_survives_a_failed_entry_and_a_failed_call(sqs, moto_url):
    url = sqs.create_queue(QueueName="keeper-batch-test")["QueueUrl"]
    for i in range(13):
        sqs.send_message(QueueUrl=url, MessageBody=f"m{i}")
    held = _receive(sqs, url, 13, visibility=3)  # 12 a worker holds with 3 s left on each, and a control one
    _, control_body = held.pop()  # not the keeper's: it comes back after 3 s
    receipts = [handle for handle, _ in held]
    sqs.delete_message(QueueUrl=url, ReceiptHandle=receipts[0])  # acked meanwhile → ReceiptHandleIsInvalid entry
    keeper = _keeper(moto_url)
    assert keeper.client.meta.config.read_timeout == 5 and keeper.client.meta.config.connect_timeout == 5
    calls: list[str] = []
    keeper.client.meta.events.register("before-call.sqs.*", lambda model, **_: calls.append(model.name))

    assert keeper.extend(url, receipts) == 11  # one failed entry, the other 11 extended
    assert calls == ["ChangeMessageVisibilityBatch", "ChangeMessageVisibilityBatch"]  # 10 + 2 entries

    # A batch call refused as a whole (throttled: one unexpected ClientError, injected on the next call) is
    # retried one message at a time: the acknowledged one fails alone, the other three are extended.
    calls.clear()
    throttled = ClientError(
        {"Error": {"Code": "ThrottlingException", "Message": "slow down"}}, "ChangeMessageVisibilityBatch"
    )

    def throttle_once(**_: Any) -> None:
        if calls.count("ChangeMessageVisibilityBatch") == 1:
            raise throttled

    keeper.client.meta.events.register("before-call.sqs.ChangeMessageVisibilityBatch", throttle_once)
    assert keeper.extend(url, receipts[:4]) == 3
    assert calls == ["ChangeMessageVisibilityBatch", *["ChangeMessageVisibility"] * 4]

    # The extended ones stay hidden after their original 3 s: only the (released) control message comes back.
    back: list[str] = []
    wait_until(lambda: back.extend(_bodies(sqs, url)) or control_body in back, 30, "the control message back again")
    assert back == [control_body], back


def _bodies(sqs: Any, url: str) -> list[str]:
    got = sqs.receive_message(QueueUrl=url, MaxNumberOfMessages=10, VisibilityTimeout=0, WaitTimeSeconds=1)
    return [m["Body"] for m in got.get("Messages", [])]
