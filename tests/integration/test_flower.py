"""Flower on the SQS broker: Celery monitoring events fanned out through SNS (samseg/queue/events.py).

The fault: on SQS, Celery's events go to a `topic` exchange whose bindings exist only in the memory of the
process that declared them, so the worker's events reach nobody and Flower shows no worker and no task.
With SAMSEG_EVENTS=true the event exchange is a `fanout` backed by an SNS topic (`<prefix>celeryev`), Flower
subscribes its own SQS queue to it, and its synchronous capture deletes received events without a kombu hub.

Real processes throughout (`celery -A samseg worker`, `celery -A samseg flower`, `celery -A samseg call`)
against the session's moto server, which speaks SNS on the same port as SQS. The in-process checks of
samseg.queue.events (configuration, version guard) are tests/unit/test_sqs_events.py.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Callable
from typing import Any

import boto3
import httpx
import pytest
from celery import Celery

from samseg.core.settings import Settings
from tests.support import VENV_BIN, free_port, wait_http

pytestmark = pytest.mark.slow

CELERY = str(VENV_BIN / "celery")
UUID_RE = re.compile(r"\b[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}\b")


def _sns(moto_url: str) -> Any:
    return boto3.client(
        "sns", endpoint_url=moto_url, region_name="us-east-1", aws_access_key_id="t", aws_secret_access_key="t"
    )


def _topic_arns(moto_url: str, prefix: str) -> list[str]:
    arns = [t["TopicArn"] for page in _sns(moto_url).get_paginator("list_topics").paginate() for t in page["Topics"]]
    return [arn for arn in arns if arn.rsplit(":", 1)[-1].startswith(prefix)]


def _subscribed_queues(moto_url: str, topic_arn: str) -> list[str]:
    subs = _sns(moto_url).list_subscriptions_by_topic(TopicArn=topic_arn)["Subscriptions"]
    return [s["Endpoint"].rsplit(":", 1)[-1] for s in subs if s["Protocol"] == "sqs"]


def _poll(what: str, probe: Callable[[], Any], timeout: float, interval: float = 0.5) -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = probe()
        except (httpx.HTTPError, ValueError) as exc:
            last = exc
        else:
            if last:
                return last
        time.sleep(interval)
    raise AssertionError(f"{what}: not after {timeout}s (last: {last!r})")


def _settings(**kw: Any) -> Settings:
    return Settings(_env_file=None, **kw)


def _call_purge(stack: Any) -> str:
    """Send one real `samseg.purge` task the way any client would (`celery call`); return its id."""
    proc = stack.start("call", CELERY, "-A", "samseg", "call", "samseg.purge")
    assert proc.popen.wait(60) == 0, proc.output()
    ids = UUID_RE.findall(proc.output())
    assert ids, proc.output()
    return str(ids[-1])


def test_flower_shows_worker_online_and_task_succeeded_over_sqs(make_stack, moto_url: str) -> None:
    """With SAMSEG_EVENTS=true Flower's API shows the worker online and a real task SUCCESS; on exit it
    deletes its event queue and SNS subscription (SQS queues have no auto-delete)."""
    stack = make_stack(
        SAMSEG_EVENTS="true", FLOWER_UNAUTHENTICATED_API="true", FLOWER_ENABLE_EVENTS="false", FLOWER_READ_ONLY="true"
    )
    prefix = stack.env["SAMSEG_QUEUE_PREFIX"]
    stack.start_worker()
    port = free_port()
    flower_proc = stack.start("flower", CELERY, "-A", "samseg", "flower", f"--port={port}", "--address=127.0.0.1")
    flower = f"http://127.0.0.1:{port}"
    wait_http(flower + "/healthcheck", 60)

    workers = _poll(
        "worker online in Flower",
        lambda: {k: v for k, v in httpx.get(flower + "/api/workers?status=true", timeout=5).json().items() if v},
        timeout=30,
    )
    (worker_name,) = workers
    assert worker_name.startswith("worker@")

    task_id = _call_purge(stack)

    def task_state() -> dict[str, Any] | None:
        task = httpx.get(flower + f"/api/task/info/{task_id}", timeout=5)
        if task.status_code == 404:
            return None
        info: dict[str, Any] = task.json()
        return info if info.get("state") == "SUCCESS" else None

    info = _poll("task SUCCESS in Flower", task_state, timeout=30)
    assert info["name"] == "samseg.purge" and info["worker"] == worker_name
    listed = httpx.get(flower + "/api/tasks", timeout=5).json()
    assert listed[task_id]["state"] == "SUCCESS"

    # The fan-out is what carried them: the stack's event topic, one subscriber (this Flower's queue).
    (topic,) = _topic_arns(moto_url, f"{prefix}celeryev")
    (queue,) = _subscribed_queues(moto_url, topic)
    assert queue.startswith(f"{prefix}celeryev-")

    # Known limit (docs/flower-on-sqs.md): no remote control on SQS. Flower's inspect broadcasts go to the
    # stack's pidbox topic, which no worker subscribes to, so its inspect-based worker details stay empty
    # while the event-based status above is live.
    for pidbox in _topic_arns(moto_url, f"{prefix}celery-pidbox"):
        assert _subscribed_queues(moto_url, pidbox) == []
    assert httpx.get(flower + "/api/workers", timeout=5).json() == {}

    # Clean exit (SIGTERM -> sys.exit -> atexit): Flower's queue and subscription are gone, and nothing of
    # this stack is left but samseg's own queues.
    assert flower_proc.stop() == 0
    assert _subscribed_queues(moto_url, topic) == []
    names = [url.rsplit("/", 1)[-1] for url in stack.sqs().list_queues().get("QueueUrls", [])]
    own = {
        stack.jobs_queue,
        f"{stack.jobs_queue}-dlq",
        f"{prefix}io",
        f"{prefix}gpu",
        f"{prefix}io-dlq",
        f"{prefix}gpu-dlq",
    }
    assert [name for name in names if prefix in name and name not in own] == []


def test_sweep_deletes_only_abandoned_event_queues(moto_url: str) -> None:
    """A killed Flower (no atexit) leaves its queue subscribed; it fills with events. The sweep deletes queues
    with a backlog and their subscriptions, and keeps a live (drained) one."""
    from samseg.queue.events import sweep_event_queues

    prefix = f"sweep{os.getpid()}-"
    app = Celery("t", set_as_current=False)
    app.conf.broker_url = f"sqs://t:t@{moto_url.removeprefix('http://')}"
    app.conf.broker_transport_options = {"region": "us-east-1", "is_secure": False, "supports_fanout": True}
    sqs = boto3.client(
        "sqs", endpoint_url=moto_url, region_name="us-east-1", aws_access_key_id="t", aws_secret_access_key="t"
    )
    sns = _sns(moto_url)
    topic = sns.create_topic(Name=f"{prefix}celeryev")["TopicArn"]
    urls = {}
    for name in ("dead", "live"):
        urls[name] = url = sqs.create_queue(QueueName=f"{prefix}celeryev-{name}")["QueueUrl"]
        arn = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
        sns.subscribe(TopicArn=topic, Protocol="sqs", Endpoint=arn, Attributes={"RawMessageDelivery": "true"})
    for _ in range(3):
        sqs.send_message(QueueUrl=urls["dead"], MessageBody="{}")

    assert sweep_event_queues(app, _settings(queue_prefix=prefix), min_backlog=3) == [f"{prefix}celeryev-dead"]
    assert _subscribed_queues(moto_url, topic) == [f"{prefix}celeryev-live"]


def test_events_off_by_default_worker_runs_without_sns(make_stack, moto_url: str) -> None:
    """Default (SAMSEG_EVENTS unset): the worker runs tasks and touches no SNS, since every event would cost an
    SNS publish (heartbeats every 2 s per worker)."""
    stack = make_stack()
    prefix = stack.env["SAMSEG_QUEUE_PREFIX"]
    worker = stack.start_worker()
    task_id = _call_purge(stack)
    worker.wait_for_output(task_id, 30)
    _poll("purge succeeded", lambda: f"{task_id}] succeeded" in worker.output(), timeout=30)
    assert _topic_arns(moto_url, prefix) == []
    assert not stack.sqs().list_queues(QueueNamePrefix=f"{prefix}celeryev").get("QueueUrls")
