"""A long outage under load (issue 15): on the several-hosts layout (S3 + DynamoDB + SQS all on one moto
server, reached by samseg only through one loopback TCP proxy, so one refused proxy = all of AWS down), a
burst of 40 jobs rides out a SIGKILL of the segment worker and of the io worker while each is busy, a
3-minute outage of all of AWS at once (started while jobs are in every stage, with new jobs still arriving
from the app server, whose own SQS client goes straight to moto) and then a 2-minute 503 app server.

Every job must end with exactly one 2xx `completed` callback (counted per uuid and per webhook-id), GET /jobs
says completed, every DLQ is empty and no work object is left under `.samseg/work/`. Processes: an io worker
and a GPU worker (compose.yaml's options), beat (the sweeper) and the API, each on a "host" of its own (a
private assets dir). AWS is the stand-in (moto); weights are random; nothing of samseg is mocked. Bounded:
the whole test is capped at DEADLINE seconds; it waits on queues and outboxes, not on fixed sleeps (the
fault windows aside).
"""

from __future__ import annotations

import base64
import json
import secrets
import signal
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import pytest

from samseg.core.contracts import JobState
from samseg.stores.lifecycle import STAGE_ORDER
from tests.faults_support import events, stack_stores, wait_until
from tests.support import AUTH, VENV_BIN, Proc, Route, TcpProxy, scene_png
from tests.system.test_chaos import FlakyAppServer, compose_worker
from tests.system.test_scale_out import _aws, _host, _objects

BURST = 40
ARRIVE_EVERY = 20  # seconds between new jobs during the outage
AWS_OUTAGE_SECONDS = 180
APP_503_SECONDS = 120
DEADLINE = 1200
WEBHOOK_SECRET = "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()


@pytest.fixture
def shared_aws(moto_url: str) -> dict[str, str]:
    bucket = f"samseg-{secrets.token_hex(4)}"
    _aws(moto_url, "s3").create_bucket(Bucket=bucket)
    return {
        "SAMSEG_STORAGE_URL": f"s3://{bucket}/prod",
        "SAMSEG_JOB_STORE_URL": f"dynamodb://samseg-jobs-{secrets.token_hex(4)}",
    }


class Recorder(FlakyAppServer):
    """FlakyAppServer that also counts 2xx callbacks per webhook-id."""

    def __init__(self, server: Any) -> None:
        super().__init__(server)
        self.by_webhook: Counter[str] = Counter()
        server.default = self._record

    def _record(self, record: Any) -> Any:
        route = self._answer(record)
        if route.status < 300:
            with self._lock:
                ids = [v for k, v in record.headers.items() if k.lower() == "webhook-id"]
                self.by_webhook[ids[0] if ids else "?"] += 1
        return route


def open_holds(proc: Proc) -> dict[str, str]:
    """uuid → stage of every stage lease this process took and never moved on (handed off / completed /
    failed): the work a SIGKILL interrupted, read from the process's own lifecycle_* log lines."""
    held: dict[str, str] = {}
    for e in events(proc):
        name, uuid = e.get("event"), e.get("job_uuid")
        if name == "lifecycle_stage_held":
            held[uuid] = e.get("stage")
        elif name in ("lifecycle_handed_off", "lifecycle_completed", "lifecycle_failed") and uuid in held:
            del held[uuid]
    return held


@pytest.mark.slow
@pytest.mark.timeout(DEADLINE + 300)
def test_long_aws_outage_kills_and_503_on_several_hosts(
    make_stack, http_server, app_server, shared_aws, moto_url, tmp_path
):
    started = time.monotonic()
    moto_port = int(moto_url.rsplit(":", 1)[1])
    # Downloads take a moment, so a download is in flight when the io worker is killed and the outage starts.
    http_server.routes["/ok.png"] = Route(body=scene_png(), headers={"Content-Type": "image/png"}, delay=1.5)
    image = f"{http_server.url}/ok.png"
    with TcpProxy("127.0.0.1", moto_port) as aws_proxy:
        flaky = Recorder(app_server)
        stack = make_stack(
            SAMSEG_APP_SERVER_URL=app_server.url,
            AWS_ENDPOINT_URL=aws_proxy.url,  # S3, DynamoDB …
            AWS_ENDPOINT_URL_SQS=aws_proxy.url,  # … and SQS: samseg reaches AWS only through the proxy
            SAMSEG_WEBHOOK_SECRET=WEBHOOK_SECRET,
            SAMSEG_VISIBILITY_TIMEOUT_SECONDS="60",
            SAMSEG_STAGE_LEASE_SECONDS="30",
            SAMSEG_SWEEP_GRACE_SECONDS="10",
            SAMSEG_SEGMENT_TIME_LIMIT_SECONDS="90",
            SAMSEG_AMG_POINTS_PER_SIDE="2",
            SAMSEG_CALLBACK_BACKOFF_SECONDS="1",
            SAMSEG_CALLBACK_BACKOFF_MAX_SECONDS="10",
            SAMSEG_CALLBACK_MAX_ATTEMPTS="200",
            **shared_aws,
        )
        direct = {**stack.env, "AWS_ENDPOINT_URL": moto_url, "AWS_ENDPOINT_URL_SQS": moto_url}  # never cut
        settings, stores = stack_stores(direct)
        io_args, io_env = compose_worker("worker-io", stack.env)
        gpu_args, gpu_env = compose_worker("worker-gpu-0", stack.env)

        def start_io(n: int) -> Proc:
            return stack.start_worker(*io_args, name=f"worker-io-{n}", env={**io_env, **_host(tmp_path, f"io{n}")})

        def start_gpu(n: int) -> Proc:
            return stack.start_worker(*gpu_args, name=f"worker-gpu-{n}", env={**gpu_env, **_host(tmp_path, f"gpu{n}")})

        api = stack.start_api(env=_host(tmp_path, "api"))
        io_procs = [start_io(0)]
        gpu_procs = [start_gpu(0)]
        stack.start("beat", str(VENV_BIN / "celery"), "-A", "samseg", "beat", "--loglevel", "INFO",
                    env=_host(tmp_path, "beat"))  # fmt: skip

        sqs = _aws(moto_url, "sqs")  # the app server's own SQS client: straight to moto, never through the proxy
        jobs_url = sqs.get_queue_url(QueueName=stack.jobs_queue)["QueueUrl"]
        uuids: list[str] = []

        def send(batch: list[str]) -> None:
            for at in range(0, len(batch), 10):
                entries = [
                    {"Id": str(i), "MessageBody": json.dumps({"uuid": uuid, "image_url": image})}
                    for i, uuid in enumerate(batch[at : at + 10])
                ]
                sqs.send_message_batch(QueueUrl=jobs_url, Entries=entries)
            uuids.extend(batch)

        send([f"outage-{i:02d}" for i in range(BURST)])

        def snapshot() -> Counter[str]:
            out: Counter[str] = Counter()
            for uuid in list(uuids):
                r = stores.jobs.get(uuid)
                if r is None:
                    out["unclaimed"] += 1
                elif r.status in (JobState.COMPLETED, JobState.FAILED):
                    state = r.callback.state if r.callback else None
                    out[f"{r.status.value}:callback-{getattr(state, 'value', state)}"] += 1
                elif r.stage is None:
                    out["queued"] += 1  # claimed, its download not started yet
                elif r.handed_off:  # the stage is done; the next one waits in its queue
                    out[f"waiting:{STAGE_ORDER[min(STAGE_ORDER.index(r.stage) + 1, 3)].value}"] += 1
                else:
                    out[f"running:{r.stage.value}"] += 1
            return out

        def in_every_stage(snap: Counter[str]) -> bool:
            """Jobs downloading, at segment (held or waiting), and at persist or notify. (Jobs on the jobs queue:
            the ones the app server sends during the outage, asserted below.)"""
            stages = {k.partition(":")[2] for k in snap if k.startswith(("running:", "waiting:"))}
            return "running:download" in snap and "segment" in stages and bool(stages & {"persist", "notify"})

        # 1. SIGKILL the segment worker while it holds a segment lease (a job is in running:segment).
        wait_until(lambda: open_holds(gpu_procs[-1]), 300, "a segment in flight", interval=0.3)
        time.sleep(1.0)
        gpu_interrupted = open_holds(gpu_procs[-1])
        gpu_status = {u: (r.status.value, r.stage.value if r.stage else None)
                      for u in gpu_interrupted if (r := stores.jobs.get(u))}  # fmt: skip
        gpu_procs[-1].kill(signal.SIGKILL)
        gpu_procs[-1].popen.wait(10)
        gpu_interrupted = open_holds(gpu_procs[-1])  # the log as the process left it
        assert gpu_interrupted and set(gpu_interrupted.values()) == {"segment"}, gpu_interrupted
        assert any(s == ("running", "segment") for s in gpu_status.values()), gpu_status
        gpu_procs.append(start_gpu(1))

        # 2. SIGKILL the io worker while it holds a download or persist lease.
        wait_until(lambda: open_holds(io_procs[-1]), 300, "an io stage in flight", interval=0.2)
        io_procs[-1].kill(signal.SIGKILL)
        io_procs[-1].popen.wait(10)
        io_interrupted = open_holds(io_procs[-1])
        assert io_interrupted, "the io worker finished everything it started: no test"
        io_procs.append(start_io(1))
        kills = 2

        # 3. All of AWS down for 3 minutes, starting while jobs are in every stage; jobs keep arriving.
        arrivals = iter(range(1000))
        send([f"outage-new-{next(arrivals):02d}" for _ in range(3)])  # some waiting on the jobs queue

        def every_stage() -> Counter[str] | None:
            snap = snapshot()
            return snap if in_every_stage(snap) else None

        try:
            at_outage = wait_until(every_stage, 180, "jobs in every stage", interval=0.2)
        except TimeoutError:
            at_outage = snapshot()  # reported below; the assertion on it follows
        aws_proxy.refuse()
        outage_started = time.monotonic()
        stop_arriving = threading.Event()

        def arrive() -> None:
            while not stop_arriving.wait(ARRIVE_EVERY):
                send([f"outage-new-{next(arrivals):02d}"])

        arriver = threading.Thread(target=arrive, daemon=True)
        arriver.start()
        time.sleep(AWS_OUTAGE_SECONDS)
        stop_arriving.set()
        arriver.join(10)
        aws_proxy.restore()
        outage_seconds = round(time.monotonic() - outage_started)

        # 4. The app server answers 503 for 2 minutes.
        flaky.unavailable.set()
        time.sleep(APP_503_SECONDS)
        flaky.unavailable.clear()
        faults_over = time.monotonic()

        # Wait (bounded) for every job's callback, every queue drained and every outbox delivered.
        remaining = lambda: DEADLINE - (time.monotonic() - started)  # noqa: E731
        try:
            wait_until(lambda: all(flaky.accepted.get(u) for u in uuids), remaining(), "a callback for every job", 2)
        except TimeoutError:
            stuck = {}
            for u in uuids:
                if not flaky.accepted.get(u) and (r := stores.jobs.get(u)) is not None:
                    due = None if r.sweep_due is None else round(r.sweep_due - time.time())
                    stuck[u] = (r.status.value, r.stage and r.stage.value, r.handed_off, r.lease_token, due)
            print("CHAOS_OUTAGE_STUCK (status, stage, handed_off, lease, sweep due in s)", stuck)
            raise
        queues = (stack.jobs_queue, settings.io_queue, settings.gpu_queue)
        queue_urls = [sqs.get_queue_url(QueueName=q)["QueueUrl"] for q in queues]

        def drained() -> bool:
            for queue_url in queue_urls:
                attrs = sqs.get_queue_attributes(
                    QueueUrl=queue_url,
                    AttributeNames=["ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"],
                )["Attributes"]
                if attrs != {"ApproximateNumberOfMessages": "0", "ApproximateNumberOfMessagesNotVisible": "0"}:
                    return False
            return True

        def delivered() -> bool:
            states = [httpx.get(f"{api}/jobs/{u}", headers=AUTH, timeout=10).json() for u in uuids]
            return all(s.get("callback", {}).get("state") == "delivered" for s in states)

        wait_until(drained, max(remaining(), 60), "every queue drained", 2)
        wait_until(delivered, max(remaining(), 30), "every outbox delivered", 2)
        wait_until(
            lambda: _objects(moto_url, shared_aws["SAMSEG_STORAGE_URL"], ".samseg/work/") == [],
            max(remaining(), 30),
            "work objects cleaned up",
            2,
        )
        statuses = {u: httpx.get(f"{api}/jobs/{u}", headers=AUTH, timeout=10).json() for u in uuids}

    # Figures first (printed even when an assertion below fails, with -s).
    segment_runs = Counter()
    for proc in gpu_procs:
        for e in events(proc):
            if e.get("event") == "image_segmented":
                segment_runs[e.get("job_uuid")] += 1
    per_job = {uuid: flaky.accepted.get(uuid, []) for uuid in uuids}
    report = {
        "jobs": len(uuids),
        "burst": BURST,
        "arrived_during_outage": len(uuids) - BURST - 3,
        "kills": kills,
        "interrupted": {"segment": gpu_interrupted, "io": io_interrupted},
        "aws_outage_seconds": outage_seconds,
        "app_server_503_seconds": APP_503_SECONDS,
        "at_outage_start": dict(at_outage),
        "callbacks_refused_503": flaky.refused,
        "segment_runs_gt1": sum(1 for n in segment_runs.values() if n > 1),
        "callbacks_gt1": sum(1 for c in per_job.values() if len(c) > 1),
        "webhook_ids_gt1": sum(1 for n in flaky.by_webhook.values() if n > 1),
        "lost": sum(1 for c in per_job.values() if not c),
        "seconds_total": round(time.monotonic() - started),
        "seconds_after_last_fault": round(time.monotonic() - faults_over),
    }
    print("CHAOS_OUTAGE", json.dumps(report))
    (Path(tmp_path) / "chaos_outage.json").write_text(json.dumps(report))

    assert in_every_stage(at_outage), at_outage
    assert len(uuids) > BURST + 3, "no job arrived during the outage"
    duplicated = {u: len(c) for u, c in per_job.items() if len(c) != 1}
    assert duplicated == {}, duplicated
    assert {k: n for k, n in flaky.by_webhook.items() if n != 1} == {}
    assert len(flaky.by_webhook) == len(uuids)
    failed = {u: c[-1].get("error") for u, c in per_job.items() if c[-1]["status"] != "completed"}
    assert failed == {}, failed
    for uuid, (body,) in per_job.items():
        assert body["segments"], uuid
        assert statuses[uuid]["status"] == "completed", (uuid, statuses[uuid])
        assert statuses[uuid]["callback"]["state"] == "delivered", (uuid, statuses[uuid])
    for dlq in (settings.dead_letter_queue, *settings.task_dead_letter_queues.values()):
        dlq_url = sqs.get_queue_url(QueueName=dlq)["QueueUrl"]
        depth = sqs.get_queue_attributes(QueueUrl=dlq_url, AttributeNames=["ApproximateNumberOfMessages"])
        assert depth["Attributes"]["ApproximateNumberOfMessages"] == "0", dlq
    assert flaky.refused > 0, "the 503 window saw no callback: no test"
    assert aws_proxy.accepted > 0
    assert set(segment_runs) >= set(uuids)
