"""Issue #15 (1): the ingress backoff reaches SQS.

A job that arrives while the job store is unreachable is handed back with a delay of 15 s doubling to
15 min (samseg.worker.ingress.retry_delay). kombu 5.7's `message.requeue()` dropped the queue URL from
delivery_info before the delay was set, so the message came back after the 10 s poll wait whatever the
delay said, and a ~50 s outage used up the jobs queue's maxReceiveCount. Here the gaps between receives of
one message are measured on a real worker (DynamoDB job store behind a refusing TCP proxy).
"""

from __future__ import annotations

import json
import secrets
from datetime import datetime
from typing import Any

from samseg.worker.ingress import retry_delay
from tests.faults_support import count_events, events, wait_until
from tests.support import TcpProxy

LAZY = {"SAMSEG_PRELOAD_MODEL": "false", "SAMSEG_AMG_POINTS_PER_SIDE": "2"}
OUTAGE_TO_SURVIVE_SECONDS = 300  # issue #15: a 5-minute job-store outage dead-letters nothing


def _failures(worker: Any, uuid: str) -> list[dict[str, Any]]:
    return [e for e in events(worker) if e.get("event") == "ingress_publish_failed" and e.get("job_uuid") == uuid]


def _at(event: dict[str, Any]) -> float:
    return datetime.fromisoformat(event["timestamp"].replace("Z", "+00:00")).timestamp()


def test_job_store_outage_backs_off_as_promised_and_the_redrive_policy_outlasts_five_minutes(
    make_stack, images, moto_url
):
    with TcpProxy("127.0.0.1", int(moto_url.rsplit(":", 1)[1])) as dynamo:
        stack = make_stack(
            SAMSEG_JOB_STORE_URL=f"dynamodb://jobs-{secrets.token_hex(4)}",
            AWS_ENDPOINT_URL_DYNAMODB=dynamo.url,
            **LAZY,
        )
        worker = stack.start_worker("-c", "1")
        dynamo.refuse()
        uuid = "ingress-backoff-1"
        stack.send_raw(json.dumps({"uuid": uuid, "image_url": f"{images.url}/ok.png"}))
        # Receives 1, 2 and 3: handed back for 15 s, then 30 s (the old code: ~10 s each time).
        wait_until(lambda: len(_failures(worker, uuid)) >= 3, 120, "three receives during the outage")
        first, second, third = _failures(worker, uuid)[:3]
        dynamo.restore()
        assert [e["receives"] for e in (first, second, third)] == [1, 2, 3]
        assert [e["retry_in_seconds"] for e in (first, second, third)] == [15, 30, 60]
        gap1, gap2 = _at(second) - _at(first), _at(third) - _at(second)
        assert 14 <= gap1 < 25, f"second receive {gap1:.1f}s after the first (delay 15 s)"
        assert gap2 >= 28, f"third receive {gap2:.1f}s after the second (delay 30 s; old code ~10 s)"
        assert count_events(worker, "ingress_delay_not_set") == 0

    # Still on the jobs queue, hidden for its 60 s delay (tests/test_faults_outages.py runs such a job to the
    # end once the store is back); not in the DLQ.
    client = stack.sqs()
    jobs_url = client.get_queue_url(QueueName=stack.jobs_queue)["QueueUrl"]
    hidden = client.get_queue_attributes(QueueUrl=jobs_url, AttributeNames=["ApproximateNumberOfMessagesNotVisible"])
    assert hidden["Attributes"]["ApproximateNumberOfMessagesNotVisible"] == "1"
    attrs = client.get_queue_attributes(QueueUrl=jobs_url, AttributeNames=["RedrivePolicy"])["Attributes"]
    policy = json.loads(attrs["RedrivePolicy"])
    max_receives = int(policy["maxReceiveCount"])
    assert max_receives == 5  # SAMSEG_JOBS_MAX_RECEIVE_COUNT's default, set by JobQueues.ensure
    assert policy["deadLetterTargetArn"].endswith(f":{stack.jobs_queue}-dlq")
    dlq = client.get_queue_url(QueueName=f"{stack.jobs_queue}-dlq")["QueueUrl"]
    depth = client.get_queue_attributes(QueueUrl=dlq, AttributeNames=["ApproximateNumberOfMessages"])
    assert depth["Attributes"]["ApproximateNumberOfMessages"] == "0"

    # A 5-minute outage, by arithmetic rather than a 5-minute test: SQS moves the message to the DLQ on the
    # receive after the maxReceiveCount-th, which comes no sooner than the sum of the delays handed back on
    # receives 1..maxReceiveCount. The delays measured above are the schedule's first two (each gap at least
    # its delay), and the schedule doubles from there: 15 + 30 + 60 + 120 + 240 = 465 s for 5 receives.
    assert gap1 >= retry_delay(1) - 1 and gap2 >= retry_delay(2) - 2
    survives = sum(retry_delay(k) for k in range(1, max_receives + 1))
    assert survives >= OUTAGE_TO_SURVIVE_SECONDS, f"{max_receives} receives span only {survives}s of outage"


def test_a_failed_sqs_publish_is_handed_back_with_the_delay_then_waits_out_the_publish_lease(make_stack, images):
    """The chain cannot be published (the io queue refuses the message: MaximumMessageSize 1024 bytes, set on
    the queue the way an operator mistake or an SQS fault would): receive 1 is handed back for 15 s; receive
    2 finds its own claim still leased (PUBLISH_LEASE_SECONDS) and waits 60 s; receive 3 publishes again."""
    stack = make_stack(**LAZY)
    client = stack.sqs()
    prefix = stack.env["SAMSEG_QUEUE_PREFIX"]
    io_url = client.create_queue(QueueName=f"{prefix}io")["QueueUrl"]
    client.set_queue_attributes(QueueUrl=io_url, Attributes={"MaximumMessageSize": "1024"})
    worker = stack.start_worker("-c", "1")
    uuid = "publish-refused-1"
    stack.send_raw(json.dumps({"uuid": uuid, "image_url": f"{images.url}/ok.png"}))
    wait_until(lambda: len(_failures(worker, uuid)) >= 2, 150, "two failed publishes")
    busy = [e for e in events(worker) if e.get("event") == "job_delivery_busy" and e.get("job_uuid") == uuid]
    first, third = _failures(worker, uuid)[:2]
    assert first["retry_in_seconds"] == 15 and first["receives"] == 1
    assert len(busy) == 1 and _at(busy[0]) - _at(first) >= 14  # the old code: ~10 s
    assert third["receives"] == 3 and third["retry_in_seconds"] == 60 and _at(third) - _at(busy[0]) >= 55
    assert count_events(worker, "ingress_delay_not_set") == 0
    jobs_url = client.get_queue_url(QueueName=stack.jobs_queue)["QueueUrl"]
    hidden = client.get_queue_attributes(QueueUrl=jobs_url, AttributeNames=["ApproximateNumberOfMessagesNotVisible"])
    assert hidden["Attributes"]["ApproximateNumberOfMessagesNotVisible"] == "1"  # kept on the queue, not lost
