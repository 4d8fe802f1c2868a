"""Poison tasks: Celery's io and gpu queues dead-letter a task after SAMSEG_TASK_MAX_RECEIVE_COUNT receives, and
samseg.queue.dead_letters reads back which job it was — on real messages that samseg's own Celery app published to
a moto server (no hand-built bodies for the positive cases)."""

from __future__ import annotations

import base64
import json
import subprocess
import sys

import pytest

from samseg.queue.dead_letters import parse_task_message, reap_once, reap_task_dead_letters, receive
from tests.faults_support import wait_until
from tests.support import VENV_BIN

PUBLISH = """
import samseg
from samseg.core.contracts import JobMessage
from samseg.worker.chain import build_chain
from samseg.worker.stages import segment
build_chain(samseg.app, JobMessage(uuid="dead-1", image_url="http://127.0.0.1:9/x.png"), "run-1").apply_async()
segment.s({"uuid": "dead-2", "run_id": "run-2", "width": 4, "height": 3}).set(task_id="dead-2.segment").apply_async()
"""


@pytest.fixture
def published(make_stack):
    """Queues ensured (max receive count 2), then one download task (io) and one segment task (gpu) published
    through samseg's own Celery app, as the ingress and a finished download publish them."""
    stack = make_stack(SAMSEG_TASK_MAX_RECEIVE_COUNT="2")
    assert stack.start("queues", str(VENV_BIN / "samseg"), "queues", "ensure").popen.wait(60) == 0
    subprocess.run([sys.executable, "-c", PUBLISH], env=stack.env, check=True, timeout=120, capture_output=True)
    return stack


def _url(stack, name: str) -> str:
    return stack.sqs().get_queue_url(QueueName=name)["QueueUrl"]


def _receive_without_deleting(client, url: str) -> dict | None:
    messages = client.receive_message(
        QueueUrl=url, MaxNumberOfMessages=1, VisibilityTimeout=0, AttributeNames=["ApproximateReceiveCount"]
    ).get("Messages", [])
    return messages[0] if messages else None


@pytest.mark.parametrize(
    ("queue", "task", "task_id", "uuid", "run_id"),
    [
        ("io", "samseg.download", "dead-1.download", "dead-1", "run-1"),
        ("gpu", "samseg.segment", "dead-2.segment", "dead-2", "run-2"),
    ],
)
def test_a_task_received_too_often_moves_to_its_dlq_and_names_its_job(published, queue, task, task_id, uuid, run_id):
    stack = published
    client = stack.sqs()
    name = stack.env["SAMSEG_QUEUE_PREFIX"] + queue
    url, dlq_url = _url(stack, name), _url(stack, f"{name}-dlq")
    policy = json.loads(
        client.get_queue_attributes(QueueUrl=url, AttributeNames=["RedrivePolicy"])["Attributes"]["RedrivePolicy"]
    )
    assert int(policy["maxReceiveCount"]) == 2 and policy["deadLetterTargetArn"].endswith(f"{name}-dlq")

    # A worker that dies with the message in hand never deletes it: receive it twice without deleting.
    counts = []
    for _ in range(2):
        message = wait_until(lambda: _receive_without_deleting(client, url), 30, f"the {task} message")
        counts.append(int(message["Attributes"]["ApproximateReceiveCount"]))
        assert parse_task_message(message["Body"]).task == task  # what a worker would have run
    assert counts == [1, 2]
    # The next receive finds the queue empty: SQS moved the message to the DLQ (moto does it on this receive).
    assert _receive_without_deleting(client, url) is None
    (letter,) = wait_until(lambda: receive(client, dlq_url, visibility_timeout=0), 30, "the dead-lettered message")
    assert letter.error is None and letter.task is not None
    assert (letter.task.task, letter.task.task_id, letter.task.job_uuid, letter.task.run_id) == (
        task,
        task_id,
        uuid,
        run_id,
    )
    assert letter.task.job is not None and letter.task.job["uuid"] == uuid


def test_the_wire_format_is_kombus_base64_envelope_of_protocol_2(published):
    """Pin what parse_task_message relies on, so a kombu/Celery upgrade that changes it fails here."""
    stack = published
    client = stack.sqs()
    url = _url(stack, stack.env["SAMSEG_QUEUE_PREFIX"] + "gpu")
    message = wait_until(lambda: _receive_without_deleting(client, url), 30, "the segment message")
    envelope = json.loads(base64.b64decode(message["Body"]))
    assert envelope["headers"]["task"] == "samseg.segment" and envelope["headers"]["id"] == "dead-2.segment"
    assert envelope["properties"]["body_encoding"] == "base64"
    args, kwargs, embed = json.loads(base64.b64decode(envelope["body"]))
    assert args == [{"uuid": "dead-2", "run_id": "run-2", "width": 4, "height": 3}] and kwargs == {}
    assert set(embed) >= {"callbacks", "errbacks", "chain"}
    # The un-encoded variant (transport option sqs_base64_encoding=False) reads the same.
    assert parse_task_message(json.dumps(envelope)) == parse_task_message(message["Body"])


def test_reap_once_deletes_only_what_the_handler_finished(published):
    stack = published
    client = stack.sqs()
    name = stack.env["SAMSEG_QUEUE_PREFIX"] + "io"
    dlq_url = _url(stack, f"{name}-dlq")
    client.send_message(QueueUrl=dlq_url, MessageBody="not a task at all")
    seen: list = []

    def refuse(letter) -> bool:  # e.g. the job store is down: keep the message for the next try
        seen.append(letter)
        return False

    wait_until(lambda: reap_once(client, dlq_url, refuse) == 0 and seen, 30, "a first look at the DLQ")
    assert seen[0].task is None and "neither JSON nor base64" in (seen[0].error or "")

    def accept(letter) -> bool:
        return True

    # The refused message was received with a 60 s visibility timeout; make it visible again for this test.
    client.change_message_visibility(QueueUrl=dlq_url, ReceiptHandle=seen[0].receipt_handle, VisibilityTimeout=0)
    assert wait_until(lambda: reap_once(client, dlq_url, accept), 30, "the reaper to delete it") == 1
    attrs = client.get_queue_attributes(
        QueueUrl=dlq_url, AttributeNames=["ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"]
    )["Attributes"]
    assert attrs == {"ApproximateNumberOfMessages": "0", "ApproximateNumberOfMessagesNotVisible": "0"}


def test_reap_task_dead_letters_visits_the_io_and_gpu_dlqs(published):
    from samseg.core.settings import Settings
    from samseg.queue.sqs import JobQueues

    stack = published
    client = stack.sqs()
    prefix = stack.env["SAMSEG_QUEUE_PREFIX"]
    for queue in ("io", "gpu"):  # what SQS's redrive would have moved there: the real task messages
        url = _url(stack, prefix + queue)
        message = wait_until(lambda u=url: _receive_without_deleting(client, u), 30, f"the {queue} task")
        client.send_message(QueueUrl=_url(stack, f"{prefix}{queue}-dlq"), MessageBody=message["Body"])
    settings = Settings(
        _env_file=None,
        queue_prefix=prefix,
        jobs_queue=stack.jobs_queue,
        AWS_ENDPOINT_URL_SQS=stack.env["AWS_ENDPOINT_URL_SQS"],
        AWS_ACCESS_KEY_ID="testing",
        AWS_SECRET_ACCESS_KEY="testing",
    )
    seen: list[tuple[str, str | None]] = []

    def handle(letter) -> bool:
        assert letter.task is not None
        seen.append((letter.task.task, letter.task.job_uuid))
        return True

    queues = JobQueues(settings)
    wait_until(lambda: (reap_task_dead_letters(queues, handle), len(seen) >= 2)[1], 30, "both dead letters handled")
    assert sorted(seen) == [("samseg.download", "dead-1"), ("samseg.segment", "dead-2")]
