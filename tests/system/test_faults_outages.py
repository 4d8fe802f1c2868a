"""Every job ends (issue 10): regression tests for the holes a reviewer found, each injecting its fault into
running processes — a moto server behind loopback TCP proxies, real workers, real HTTP servers.

1. ingress: the job store unreachable when a job arrives → the message is handed back with a backoff and the
   job completes once the store is back (it never reaches the DLQ, its status never sticks at `queued`);
2. the job store unreachable mid-chain → the stage is retried, the job completes with one callback;
4. a stage whose worker dies on every delivery → dead-lettered after SAMSEG_TASK_MAX_RECEIVE_COUNT receives,
   and its run ends `failed` with `worker_lost` (one callback);
8. SIGTERM (scale-in) during a segment → the running job finishes, prefetched messages go back at once;
9. no app server configured → a start-up warning, and the job status says why no callback went out.
(3 — hangs — is tests/integration/test_watchdog_workers.py; 5 — memory — benchmarks/persist.py; 6 — health —
tests/integration/test_readyz.py and tests/integration/test_metrics_hosts.py; 7 — packaging —
tests/system/test_packaging.py.)
"""

from __future__ import annotations

import json
import secrets
import signal
import subprocess
import time
from typing import Any

import httpx

from samseg.core.contracts import OutboxState
from samseg.stores.lifecycle import Lifecycle
from tests.faults_support import (
    CALLBACK_PREFIX,
    count_events,
    events,
    is_callback,
    outbox_state,
    settled_callbacks,
    stack_stores,
    task_received,
    wait_until,
)
from tests.support import AUTH, VENV_BIN, Route, TcpProxy

LAZY = {"SAMSEG_PRELOAD_MODEL": "false", "SAMSEG_AMG_POINTS_PER_SIDE": "2"}


def _dynamo_stack(make_stack: Any, proxy: TcpProxy, **env: str) -> Any:
    """A stack whose job store is DynamoDB reached through `proxy` (SQS and the images stay direct)."""
    return make_stack(
        SAMSEG_JOB_STORE_URL=f"dynamodb://jobs-{secrets.token_hex(4)}",
        AWS_ENDPOINT_URL_DYNAMODB=proxy.url,
        **env,
    )


def _status(api: str, uuid: str) -> dict[str, Any] | None:
    response = httpx.get(f"{api}/jobs/{uuid}", headers=AUTH, timeout=10)
    return response.json() if response.status_code == 200 else None


def test_ingress_keeps_a_job_it_cannot_record_and_runs_it_once_the_store_is_back(
    make_stack, images, app_server, moto_url
):
    with TcpProxy("127.0.0.1", int(moto_url.rsplit(":", 1)[1])) as dynamo:
        stack = _dynamo_stack(make_stack, dynamo, SAMSEG_APP_SERVER_URL=app_server.url, **LAZY)
        worker = stack.start_worker("-c", "1")
        dynamo.refuse()
        uuid = "ingress-outage-1"
        stack.send_raw(json.dumps({"uuid": uuid, "image_url": f"{images.url}/ok.png"}))
        wait_until(lambda: count_events(worker, "ingress_publish_failed", uuid) >= 1, 60, "the failed claim")
        retry = next(e for e in events(worker) if e.get("event") == "ingress_publish_failed")
        assert retry["retry_in_seconds"] >= 15  # handed back with a delay, not spun on
        dynamo.restore()
        app_server.wait_for(is_callback(uuid), timeout=180)
        sent = settled_callbacks(stack, app_server, uuid, timeout=150)  # the job store is behind the proxy
    (body,) = [r.json() for r in sent]
    assert body["status"] == "completed"
    dlq = stack.sqs().get_queue_url(QueueName=f"{stack.jobs_queue}-dlq")["QueueUrl"]
    attrs = stack.sqs().get_queue_attributes(QueueUrl=dlq, AttributeNames=["ApproximateNumberOfMessages"])
    assert attrs["Attributes"]["ApproximateNumberOfMessages"] == "0"
    assert count_events(worker, "job_accepted", uuid) == 1


def test_job_store_outage_mid_chain_is_retried_and_the_job_completes_once(make_stack, images, app_server, moto_url):
    with TcpProxy("127.0.0.1", int(moto_url.rsplit(":", 1)[1])) as dynamo:
        # The retry cannot release its stage lease while the store is down, so its next copy waits that lease
        # out: the smallest lease allowed keeps the wait short (the lease's length is not what is tested).
        stack = _dynamo_stack(
            make_stack, dynamo, SAMSEG_APP_SERVER_URL=app_server.url, SAMSEG_STAGE_LEASE_SECONDS="10", **LAZY
        )
        worker = stack.start_worker("-c", "2")
        uuid = "store-outage-1"
        stack.send_raw(json.dumps({"uuid": uuid, "image_url": f"{images.url}/ok.png"}))
        wait_until(lambda: task_received(worker, uuid, "segment") >= 1, 120, "the segment stage")
        dynamo.refuse()  # segment's or persist's status write meets the outage
        wait_until(lambda: count_events(worker, "stage_retry_after_outage", uuid) >= 1, 120, "a stage retried")
        time.sleep(5)  # the outage lasts a while; the retry is scheduled with a delay
        dynamo.restore()
        app_server.wait_for(is_callback(uuid), timeout=240)
        sent = settled_callbacks(stack, app_server, uuid, timeout=150)  # the job store is behind the proxy
    (body,) = [r.json() for r in sent]
    assert body["status"] == "completed" and body["segments"], body
    assert count_events(worker, "job_failed", uuid) == 0


def test_a_callback_answered_just_before_a_job_store_outage_is_recorded_after_it_and_sent_once(
    make_stack, images, app_server, moto_url
):
    """Regression (CI of stop 23: the chaos run's app server accepted `outage-06`'s callback twice). An attempt
    got 200, the job store went down before the answer was recorded and stayed down past the send marker; once
    it was back, another attempt took the run-out marker and PATCHed again. Now the worker keeps the answer and
    records it when the store is back, and the other attempt — played here by the test, which reaches the store
    directly while the worker cannot (a partition), the moment the marker has run out — only opens a reclaim
    window: it sends nothing, and the late record lands inside that window."""
    with TcpProxy("127.0.0.1", int(moto_url.rsplit(":", 1)[1])) as dynamo:
        # A 2 s callback timeout makes the send marker 14 s (2 x timeout + 10): the outage outlasts it sooner.
        stack = _dynamo_stack(
            make_stack, dynamo, SAMSEG_APP_SERVER_URL=app_server.url, SAMSEG_CALLBACK_TIMEOUT_SECONDS="2", **LAZY
        )
        _, stores = stack_stores({**stack.env, "AWS_ENDPOINT_URL_DYNAMODB": moto_url})  # the test's view, never cut
        settings, _ = stack_stores(stack.env)
        other_attempt = Lifecycle(stores.jobs, settings)
        uuid = "answered-then-outage-1"

        def accept_then_cut_the_store(_: Any) -> Route:
            dynamo.refuse()
            return Route(200, b"{}", {"Content-Type": "application/json"})

        app_server.routes[CALLBACK_PREFIX + uuid] = accept_then_cut_the_store
        worker = stack.start_worker("-c", "2")
        stack.send_raw(json.dumps({"uuid": uuid, "image_url": f"{images.url}/ok.png"}))
        app_server.wait_for(is_callback(uuid), timeout=240)
        wait_until(lambda: count_events(worker, "callback_outcome_unrecorded", uuid) == 1, 30, "the answer kept")
        record = stores.jobs.get(uuid)
        assert record is not None and record.callback is not None and record.callback.state is OutboxState.SENDING
        marker = record.callback.sending_until
        assert marker is not None
        wait_until(lambda: time.time() > marker + 1, marker - time.time() + 30, "the send marker to run out")
        assert other_attempt.begin_send(uuid, record.run_id or "") is None  # the old way: a ticket, a second PATCH
        reclaim_at = stores.jobs.get(uuid).callback.reclaim_at
        assert reclaim_at is not None and reclaim_at > time.time()
        dynamo.restore()
        wait_until(lambda: outbox_state(stack, uuid) == "delivered", 30, "the late record")
        assert time.time() < reclaim_at  # recorded inside the window
        app_server.routes.pop(CALLBACK_PREFIX + uuid)
        (late,) = [e for e in events(worker) if e.get("event") == "callback_outcome_recorded_late"]
        assert late["marker_lost"] is False, late
        sent = settled_callbacks(stack, app_server, uuid, timeout=150)
    assert len(sent) == 1 and sent[0].json()["status"] == "completed"
    box = stores.jobs.get(uuid).callback
    assert box.attempts == 1 and box.delivered and box.reclaim_at is None, box


def test_a_task_that_kills_its_worker_every_time_ends_failed_with_worker_lost(make_stack, images, app_server):
    stack = make_stack(
        SAMSEG_APP_SERVER_URL=app_server.url,
        SAMSEG_VISIBILITY_TIMEOUT_SECONDS="30",
        SAMSEG_SEGMENT_TIME_LIMIT_SECONDS="60",
        SAMSEG_TASK_MAX_RECEIVE_COUNT="2",
        # Shorter than the visibility timeout: each redelivery finds the killed holder's lease run out and takes
        # over (with a live lease it would be handed back as a new message; then the lifecycle's own count of
        # takeovers ends the run — tests/unit/test_lifecycle.py).
        SAMSEG_STAGE_LEASE_SECONDS="10",
        **LAZY,
    )
    subprocess.run([str(VENV_BIN / "samseg"), "queues", "ensure"], env=stack.env, check=True, timeout=60)
    prefix = stack.env["SAMSEG_QUEUE_PREFIX"]
    stack.start_worker("-Q", f"{stack.jobs_queue},{prefix}io", "-c", "2", name="io")
    uuid = "poison-1"
    stack.send_raw(json.dumps({"uuid": uuid, "image_url": f"{images.url}/ok.png"}))
    # The "poison": the segment worker dies on each delivery (as the kernel's OOM killer would kill it).
    for attempt in range(2):
        gpu = stack.start_worker("-Q", f"{prefix}gpu", "-c", "1", name=f"gpu-{attempt}")
        wait_until(lambda g=gpu: task_received(g, uuid, "segment") == 1, 120, f"delivery {attempt + 1} of segment")
        gpu.kill(signal.SIGKILL)
        gpu.popen.wait(10)
    # The third receive finds the message moved to the gpu DLQ; the reaper (beat, every minute) ends the run.
    client = stack.sqs()
    dlq = client.get_queue_url(QueueName=f"{prefix}gpu-dlq")["QueueUrl"]
    gpu_url = client.get_queue_url(QueueName=f"{prefix}gpu")["QueueUrl"]

    def in_dlq() -> bool:
        client.receive_message(QueueUrl=gpu_url, WaitTimeSeconds=1, VisibilityTimeout=0)  # triggers the redrive
        attrs = client.get_queue_attributes(QueueUrl=dlq, AttributeNames=["ApproximateNumberOfMessages"])
        return attrs["Attributes"]["ApproximateNumberOfMessages"] == "1"

    wait_until(in_dlq, 90, "the segment message dead-lettered")
    stack.start("beat", str(VENV_BIN / "celery"), "-A", "samseg", "beat", "--loglevel", "INFO")
    app_server.wait_for(is_callback(uuid), timeout=150)
    # The sweeper may have republished the stuck segment just before the reaper failed the run; a healthy GPU
    # worker (as production has) takes that copy and ends it quietly (the run is over), so the queues drain.
    stack.start_worker("-Q", f"{prefix}gpu", "-c", "1", name="gpu-healthy", env={"SAMSEG_TEST_FAULT": ""})
    (body,) = [r.json() for r in settled_callbacks(stack, app_server, uuid, timeout=150)]
    assert body["status"] == "failed" and body["error"]["code"] == "worker_lost", body
    wait_until(
        lambda: (
            client.get_queue_attributes(QueueUrl=dlq, AttributeNames=["ApproximateNumberOfMessages"])["Attributes"][
                "ApproximateNumberOfMessages"
            ]
            == "0"
        ),
        30,
        "the reaped message deleted",
    )


def test_sigterm_during_segment_finishes_the_job_and_releases_prefetched_messages(make_stack, images, app_server):
    stack = make_stack(
        SAMSEG_APP_SERVER_URL=app_server.url,
        SAMSEG_VISIBILITY_TIMEOUT_SECONDS="600",  # a released message must not wait for this
        **LAZY,
    )
    prefix = stack.env["SAMSEG_QUEUE_PREFIX"]
    stack.start_worker("-Q", f"{stack.jobs_queue},{prefix}io", "-c", "2", name="io")
    gpu = stack.start_worker("-Q", f"{prefix}gpu", "--pool", "solo", "--prefetch-multiplier", "4", name="gpu-a")
    uuids = [f"scale-in-{i}" for i in range(4)]
    for uuid in uuids:
        stack.send_raw(json.dumps({"uuid": uuid, "image_url": f"{images.url}/ok.png"}))
    wait_until(
        lambda: sum(task_received(gpu, u, "segment") for u in uuids) >= 2, 180, "a segment running, one prefetched"
    )
    gpu.kill(signal.SIGTERM)  # what ECS/Kubernetes send when a task is stopped
    assert gpu.popen.wait(120) == 0  # warm shutdown: the running segment finished first
    finished_there = [u for u in uuids if count_events(gpu, "image_segmented", u)]
    assert finished_there, "the running job did not finish on the stopping worker"
    client = stack.sqs()
    url = client.get_queue_url(QueueName=f"{prefix}gpu")["QueueUrl"]
    attrs = client.get_queue_attributes(QueueUrl=url, AttributeNames=["ApproximateNumberOfMessagesNotVisible"])
    assert attrs["Attributes"]["ApproximateNumberOfMessagesNotVisible"] == "0"  # prefetched ones went back
    stack.start_worker("-Q", f"{prefix}gpu", "--pool", "solo", name="gpu-b")
    for uuid in uuids:
        app_server.wait_for(is_callback(uuid), timeout=240)
    assert all(len(settled_callbacks(stack, app_server, u, timeout=150)) == 1 for u in uuids)


def test_no_app_server_configured_warns_at_start_and_the_status_says_why(make_stack, images):
    stack = make_stack(**LAZY)
    stack.env.pop("SAMSEG_APP_SERVER_URL", None)
    api = stack.start_api()
    worker = stack.start_worker("-c", "1")
    warnings = [e for e in events(worker) if e.get("event") == "callback_transport"]
    assert any("SAMSEG_APP_SERVER_URL" in e.get("problem", "") for e in warnings), warnings
    uuid = "no-app-server-1"
    stack.send_raw(json.dumps({"uuid": uuid, "image_url": f"{images.url}/ok.png"}))
    status = wait_until(
        lambda: (
            (s := _status(api, uuid))
            and s["status"] in ("completed", "failed")
            and (s.get("callback") or {}).get("state") not in (None, "pending", "sending")
            and s
        ),
        180,
        "the job to end and its outbox to close",
    )
    callback = status["callback"]
    assert (callback["state"], callback["delivered"], callback["attempts"], callback["error"]) == (
        "skipped",
        False,
        0,
        "no app server configured",
    ), status
