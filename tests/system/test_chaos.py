"""Chaos under load (issue 10): a burst of 30 jobs while the segment worker is SIGKILLed twice, SQS is
unreachable for 30 s and the app server answers 503 for 20 s — every job must end with exactly one terminal
callback, and all must complete.

The worker layout and pools are read from compose.yaml (the production stack): an io worker consuming the
jobs and io queues, a GPU worker on the gpu queue. Faults come from outside, as in production: SIGKILL of the
GPU worker's process group (restarted at once, as an orchestrator would), a loopback TCP proxy in front of
moto's SQS that refuses every connection for 30 s (started while a job is being segmented), and a loopback
app server that answers 503 with Retry-After. AWS is the stand-in (moto); weights are random; nothing of
samseg is mocked. Bounded: the whole test is capped at CHAOS_DEADLINE seconds.
"""

from __future__ import annotations

import json
import re
import shlex
import signal
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import boto3
import pytest
import yaml

from samseg.core.contracts import JobState
from tests.faults_support import count_events, events, leftovers, stack_stores, wait_until
from tests.support import REPO, Recorded, Route, TcpProxy

JOBS = 30
OUTAGE_SECONDS = 30
APP_503_SECONDS = 20
KILLS = 2
CHAOS_DEADLINE = 900
CALLBACK = "/api/v1/re-imagine/auto-mask/"


def compose_worker(service: str, env: dict[str, str]) -> tuple[list[str], dict[str, str]]:
    """The `celery worker` options compose.yaml gives `service` (its ${VAR:-default} filled from `env`), and
    the Celery variables of its environment (e.g. the GPU worker's custom pool)."""
    services = yaml.safe_load((REPO / "compose.yaml").read_text())["services"]
    celery_env = {k: str(v) for k, v in (services[service].get("environment") or {}).items() if k.startswith("CELERY_")}
    command = services[service]["command"]
    text = command if isinstance(command, str) else shlex.join(command)
    text = re.sub(r"\$\{(\w+):-([^}]*)\}", lambda m: env.get(m.group(1), m.group(2)), text)
    argv = shlex.split(text)
    assert argv[:4] == ["celery", "-A", "samseg", "worker"], argv
    options = argv[4:]
    if "-n" in options:  # the test names its workers itself
        at = options.index("-n")
        del options[at : at + 2]
    return options, celery_env


class FlakyAppServer:
    """The app server: 200 normally, 503 + Retry-After while `unavailable` is set.

    `accepted` holds the callbacks it answered 200 — the ones that count as delivered; a 503'd attempt is a
    retry samseg must make, not a second callback."""

    def __init__(self, server: Any) -> None:
        self.server = server
        self.unavailable = threading.Event()
        self.refused = 0
        self.accepted: dict[str, list[dict[str, Any]]] = {}
        self._lock = threading.Lock()
        server.default = self._answer  # type: ignore[assignment]

    def _answer(self, record: Recorded) -> Route:
        if self.unavailable.is_set():
            self.refused += 1
            return Route(503, b"busy", {"Retry-After": "4"})
        with self._lock:
            self.accepted.setdefault(record.path.removeprefix(CALLBACK), []).append(record.json())
        return Route(200, b"{}", {"Content-Type": "application/json"})

    def delivered(self) -> int:
        with self._lock:
            return len(self.accepted)


@pytest.mark.slow
def test_burst_of_30_jobs_survives_kills_an_sqs_outage_and_a_503_app_server(
    make_stack, images, app_server, moto_url, tmp_path
):
    started = time.monotonic()
    moto_port = int(moto_url.rsplit(":", 1)[1])
    with TcpProxy("127.0.0.1", moto_port) as sqs_proxy:
        flaky = FlakyAppServer(app_server)
        stack = make_stack(
            SAMSEG_APP_SERVER_URL=app_server.url,
            AWS_ENDPOINT_URL_SQS=sqs_proxy.url,  # workers reach SQS only through the proxy
            SAMSEG_VISIBILITY_TIMEOUT_SECONDS="30",
            SAMSEG_SEGMENT_TIME_LIMIT_SECONDS="60",
            SAMSEG_AMG_POINTS_PER_SIDE="2",
            # Callbacks ride out the 503 window: Retry-After 4 s, up to 12 attempts (~45 s).
            SAMSEG_CALLBACK_MAX_ATTEMPTS="12",
            SAMSEG_CALLBACK_BACKOFF_SECONDS="1",
            SAMSEG_CALLBACK_BACKOFF_MAX_SECONDS="5",
        )
        direct = {**stack.env, "AWS_ENDPOINT_URL_SQS": moto_url}  # the test's own view, never cut
        io_args, io_env = compose_worker("worker-io", stack.env)
        gpu_args, gpu_env = compose_worker("worker-gpu-0", stack.env)
        stack.start_worker(*io_args, name="worker-io", env=io_env)
        gpu = [stack.start_worker(*gpu_args, name="worker-gpu-0", env=gpu_env)]
        settings, stores = stack_stores(direct)

        client = boto3.client(  # the test's own SQS client: straight to moto, never through the proxy
            "sqs",
            endpoint_url=moto_url,
            region_name="us-east-1",
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
        )
        url = client.get_queue_url(QueueName=stack.jobs_queue)["QueueUrl"]
        uuids = [f"chaos-{i:02d}" for i in range(JOBS)]
        image = f"{images.url}/ok.png"
        for batch in range(0, JOBS, 10):
            entries = [
                {"Id": str(i), "MessageBody": json.dumps({"uuid": uuid, "image_url": image})}
                for i, uuid in enumerate(uuids[batch : batch + 10])
            ]
            client.send_message_batch(QueueUrl=url, Entries=entries)

        def segmenting() -> str | None:
            for uuid in uuids:
                record = stores.jobs.get(uuid)
                if record and record.stage and record.stage.value == "segment":
                    return uuid
            return None

        def running_segments(proc: Any) -> set[str]:
            """Jobs whose segment task `proc` started (took the stage's lease) and has not finished (neither
            segmented nor handed back after an outage)."""
            log = events(proc)
            held = {
                e.get("job_uuid")
                for e in log
                if e.get("event") == "lifecycle_stage_held" and e.get("stage") == "segment"
            }
            ended = {
                e.get("job_uuid")
                for e in log
                if e.get("event")
                in ("image_segmented", "stage_retry_after_outage", "stage_left_for_redelivery", "task_soft_time_limit")
            }
            return {str(u) for u in held - ended if u}

        interrupted: dict[int, set[str]] = {}

        def kill_and_restart(n: int) -> None:
            victim = gpu[-1]
            wait_until(lambda: running_segments(victim), 240, f"a segment task running before kill {n}", interval=0.2)
            time.sleep(0.5)
            running = running_segments(victim)
            victim.kill(signal.SIGKILL)
            victim.popen.wait(10)
            # Its whole log is in now: what it had started and never finished was cut off by the kill.
            interrupted[n] = running & running_segments(victim)
            assert interrupted[n], f"kill {n} interrupted no segment task: running was {running}"
            gpu.append(stack.start_worker(*gpu_args, name=f"worker-gpu-0-restart{n}", env=gpu_env))

        # 1. First SIGKILL, as soon as a job is being segmented.
        kill_and_restart(1)
        # 2. SQS unreachable for 30 s, starting while a job is being segmented.
        wait_until(segmenting, 240, "a job in segment before the outage", interval=0.2)
        sqs_proxy.refuse()
        outage_started = time.monotonic()
        time.sleep(OUTAGE_SECONDS)
        sqs_proxy.restore()
        # 3. The app server answers 503 for 20 s.
        flaky.unavailable.set()
        time.sleep(APP_503_SECONDS)
        flaky.unavailable.clear()
        # 4. Second SIGKILL, while a job is being segmented (if any is left to segment).
        if flaky.delivered() < JOBS - 2:
            kill_and_restart(2)
            kills = 2
        else:
            kills = 1
        faults_over = time.monotonic()

        remaining = CHAOS_DEADLINE - (time.monotonic() - started)
        wait_until(lambda: flaky.delivered() == JOBS, remaining, "a terminal callback for every job", interval=1)
        # Drained: no message left anywhere (visible or in flight), so no callback can still be on its way.
        queues = [stack.jobs_queue, settings.io_queue, settings.gpu_queue]
        queue_urls = [client.get_queue_url(QueueName=name)["QueueUrl"] for name in queues]

        def drained() -> bool:
            for queue_url in queue_urls:
                attrs = client.get_queue_attributes(
                    QueueUrl=queue_url,
                    AttributeNames=["ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"],
                )["Attributes"]
                if attrs != {"ApproximateNumberOfMessages": "0", "ApproximateNumberOfMessagesNotVisible": "0"}:
                    return False
            return True

        wait_until(drained, 120, "every queue drained")

    per_job = {uuid: flaky.accepted.get(uuid, []) for uuid in uuids}
    duplicated = {u: len(c) for u, c in per_job.items() if len(c) != 1}
    outcomes = Counter(c[-1]["status"] for c in per_job.values())
    failed = {u: c[-1].get("error") for u, c in per_job.items() if c[-1]["status"] != "completed"}
    assert duplicated == {}, duplicated
    assert failed == {}, failed
    assert outcomes == {"completed": JOBS}
    for uuid, (body,) in per_job.items():
        assert body["segments"], uuid
    records = {uuid: stores.jobs.get(uuid) for uuid in uuids}
    stuck = {u: (r.status.value if r else None) for u, r in records.items() if not r or r.status != JobState.COMPLETED}
    assert stuck == {}
    for dlq in (settings.dead_letter_queue, *settings.task_dead_letter_queues.values()):
        dlq_url = client.get_queue_url(QueueName=dlq)["QueueUrl"]
        depth = client.get_queue_attributes(QueueUrl=dlq_url, AttributeNames=["ApproximateNumberOfMessages"])
        assert depth["Attributes"]["ApproximateNumberOfMessages"] == "0", dlq
    assert leftovers(stack.assets) == {"work": []}
    assert flaky.refused > 0, "the 503 window saw no callback: no test"
    assert sum(count_events(p, "image_segmented") for p in gpu) >= JOBS
    # Every kill cut a segment task off mid-run, and that job was segmented again afterwards by a later worker.
    assert sorted(interrupted) == list(range(1, kills + 1)), interrupted
    for n, cut in interrupted.items():
        later = gpu[n:]
        assert all(sum(count_events(p, "image_segmented", u) for p in later) >= 1 for u in cut), (n, cut)

    report = {
        "jobs": JOBS,
        "kills": kills,
        "sqs_outage_seconds": OUTAGE_SECONDS,
        "app_server_503_seconds": APP_503_SECONDS,
        "callbacks_refused_503": flaky.refused,
        "lost": JOBS - len(per_job) + sum(1 for c in per_job.values() if not c),
        "duplicated": len(duplicated),
        "seconds_total": round(time.monotonic() - started),
        "seconds_after_last_fault": round(time.monotonic() - faults_over),
        "outage_started_after": round(outage_started - started),
    }
    print("CHAOS", json.dumps(report))
    (Path(tmp_path) / "chaos.json").write_text(json.dumps(report))
