"""A segment worker killed while it holds messages — one running, one prefetched — loses none of them and
none comes back late (issue 11: prefetch multiplier 2 / two threads, a 2-minute base visibility timeout).

Real moto SQS server, real `celery -A samseg worker` processes started with the commands `samseg up` and
compose.yaml use for the segment worker, SAM-2 with random weights (see conftest). The fault is injected from
outside: SIGSTOP of the pool process (a stand-in for a long inference that costs no CPU here), SIGKILL of the
worker's whole process group. No samseg code is mocked.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import signal
import subprocess
import time
from typing import Any

import pytest
import yaml

from samseg.cli.stack import up_worker_commands
from tests.faults_support import (
    callbacks,
    children,
    count_events,
    events,
    is_callback,
    settled_callbacks,
    task_received,
    wait_until,
)
from tests.support import REPO, VENV_BIN, Route, scene_png

VISIBILITY = 30  # the smallest Settings accepts: the bound under test, kept short so the test is too
LAZY = {"SAMSEG_PRELOAD_MODEL": "false", "SAMSEG_AMG_POINTS_PER_SIDE": "2"}
CELERY = [str(VENV_BIN / "celery"), "-A", "samseg"]


def _segment_command(kind: str, gpu_queue: str) -> tuple[list[str], dict[str, str]]:
    """The segment worker exactly as `samseg up` (kind "up") or compose.yaml (kind "compose") starts it."""
    if kind == "up":
        command = up_worker_commands("unused-jobs", "unused-io", gpu_queue, CELERY)["worker-segment"]
        return command.argv, command.env
    compose = yaml.safe_load((REPO / "compose.yaml").read_text())
    argv = str(compose["services"]["worker-gpu-0"]["command"]).split()
    argv = [gpu_queue if a.endswith("}gpu") else a for a in argv]
    env = {k: str(v) for k, v in compose["x-gpu-worker"]["environment"].items() if k.startswith("CELERY_")}
    return [*CELERY, *argv[3:]], env


def _held(proc: Any) -> set[str]:
    """Segment tasks the worker received and has not finished (its unacknowledged messages)."""
    received, finished = set(), set()
    for event in events(proc):
        name, uuid = str(event.get("event", "")), event.get("job_uuid")
        if name.startswith("Task samseg.segment[") and name.endswith("] received"):
            received.add(uuid)
        elif name == "image_segmented":
            finished.add(uuid)
    return received - finished


def _gpu_counts(stack: Any) -> tuple[int, int]:
    client = stack.sqs()
    url = client.get_queue_url(QueueName=stack.env["SAMSEG_QUEUE_PREFIX"] + "gpu")["QueueUrl"]
    attrs = client.get_queue_attributes(
        QueueUrl=url, AttributeNames=["ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"]
    )["Attributes"]
    return int(attrs["ApproximateNumberOfMessages"]), int(attrs["ApproximateNumberOfMessagesNotVisible"])


def _start(stack: Any, name: str, argv: list[str], env: dict[str, str]) -> Any:
    saved = dict(stack.env)
    stack.env.update(env)
    try:
        proc = stack.start(name, *argv)
    finally:
        stack.env.clear()
        stack.env.update(saved)
    proc.wait_for_output("worker_ready", 90)
    return proc


@pytest.mark.parametrize("kind", ["up", "compose"])
def test_killed_segment_worker_loses_no_prefetched_message_and_none_waits_past_the_timeout(
    kind: str, make_stack: Any, http_server: Any, app_server: Any
) -> None:
    """Fault: three jobs; the segment worker (samseg up's prefork worker with --prefetch-multiplier 2, or
    compose's two-thread model pool) holds two segment messages — one running, one prefetched/waiting for
    the model. For "up", its pool process is then frozen for the visibility timeout + 8 s while the main
    process (receipts, visibility keeper) runs on. Then the whole worker is SIGKILLed and another one started.
    Outcome: during the freeze both held messages stay invisible — the keeper extends the prefetched one as
    well as the running one, so neither is delivered twice; after the kill both come back within the
    visibility timeout (plus the new worker's start-up), not after the old 1-hour default; every job ends in
    exactly one `completed` callback."""
    stack = make_stack(
        SAMSEG_APP_SERVER_URL=app_server.url,
        SAMSEG_VISIBILITY_TIMEOUT_SECONDS=str(VISIBILITY),
        SAMSEG_SEGMENT_TIME_LIMIT_SECONDS="60",
        # The killed holder's stage lease runs out before its message comes back (else the redelivered copy is
        # handed back once, up to a minute, until the lease ran out: docs/operations.md "The job lifecycle").
        SAMSEG_STAGE_LEASE_SECONDS="10",
        **LAZY,
    )
    prefix = stack.env["SAMSEG_QUEUE_PREFIX"]
    http_server.routes["/img.png"] = Route(body=scene_png(), headers={"Content-Type": "image/png"})
    io_argv = [*CELERY, "worker", "-Q", f"{stack.jobs_queue},{prefix}io", "-c", "2", "--pool", "threads"]
    _start(stack, "io", [*io_argv, "--hostname", "io@%h"], {})
    argv, env = _segment_command(kind, f"{prefix}gpu")
    worker_a = _start(stack, "segment-a", argv, env)

    uuids = [f"prefetch-{kind}-{i}" for i in range(3)]
    for uuid in uuids:
        stack.send_raw(json.dumps({"uuid": uuid, "image_url": f"{http_server.url}/img.png"}))
    wait_until(lambda: len(_held(worker_a)) == 2, 90, "the worker holding two segment messages", interval=0.05)

    if kind == "up":
        pool = children(worker_a.popen.pid)
        for pid in pool:
            os.kill(pid, signal.SIGSTOP)
        time.sleep(0.5)  # log lines already written by the frozen process reach the file
        held = _held(worker_a)
        assert len(held) == 2, held
        try:
            held_until = time.monotonic() + VISIBILITY + 8
            while time.monotonic() < held_until:
                assert _gpu_counts(stack)[1] == 2, "a held message became visible: not extended"
                time.sleep(2)
            assert _held(worker_a) == held
            assert all(task_received(worker_a, u, "segment") <= 1 for u in uuids)
        finally:
            for pid in pool:
                os.kill(pid, signal.SIGCONT)
    held = _held(worker_a)
    assert len(held) == 2, held
    worker_a.kill(signal.SIGKILL)
    worker_a.popen.wait(10)
    killed_at = time.time()

    worker_b = _start(stack, "segment-b", argv, env)
    ready_after = time.time() - killed_at
    wait_until(lambda: all(task_received(worker_b, u, "segment") for u in held), VISIBILITY + 90, "redelivery")
    received_after = {
        e["job_uuid"]: dt.datetime.fromisoformat(e["timestamp"]).timestamp() - killed_at
        for e in events(worker_b)
        if str(e.get("event", "")).endswith("] received") and e.get("job_uuid") in held
    }
    # The bound under test: visible again at most one visibility timeout after the kill (the last extension
    # set "now + timeout"), then received as soon as worker B polls. 10 s of slack for a loaded machine.
    bound = max(VISIBILITY, ready_after) + 10
    assert set(received_after) == held and max(received_after.values()) <= bound, (received_after, bound)
    for uuid in uuids:
        app_server.wait_for(is_callback(uuid), timeout=180)
    for uuid in uuids:
        sent = settled_callbacks(stack, app_server, uuid, timeout=150)
        assert len(sent) == 1 and sent[0].json()["status"] == "completed", [r.json() for r in sent]
        assert count_events(worker_a, "image_segmented", uuid) + count_events(worker_b, "image_segmented", uuid) == 1
    for uuid in held:
        assert task_received(worker_b, uuid, "segment") == 1


def test_a_backlog_drains_without_holding_more_than_the_prefetch_limit(
    make_stack: Any, http_server: Any, app_server: Any
) -> None:
    """Prompt polling parks a full queue and resumes it on every acknowledgement; a wake-up and the safety
    re-check must never start a second poll loop for the queue. Fault: none — a backlog of four jobs on
    `samseg up`'s segment worker (-c 1, --prefetch-multiplier 2). Outcome: at no moment does the worker hold
    more than 2 segment messages (its log and SQS's in-flight count agree), and all four complete, once each."""
    stack = make_stack(SAMSEG_APP_SERVER_URL=app_server.url, **LAZY)
    prefix = stack.env["SAMSEG_QUEUE_PREFIX"]
    http_server.routes["/img.png"] = Route(body=scene_png(), headers={"Content-Type": "image/png"})
    io_argv = [*CELERY, "worker", "-Q", f"{stack.jobs_queue},{prefix}io", "-c", "4", "--pool", "threads"]
    _start(stack, "io", [*io_argv, "--hostname", "io@%h"], {})
    argv, env = _segment_command("up", f"{prefix}gpu")
    worker = _start(stack, "segment", argv, env)

    uuids = [f"drain-{i}" for i in range(4)]
    for uuid in uuids:
        stack.send_raw(json.dumps({"uuid": uuid, "image_url": f"{http_server.url}/img.png"}))
    most_held, most_in_flight = 0, 0
    deadline = time.monotonic() + 240
    while not all(callbacks(app_server, u) for u in uuids):
        assert time.monotonic() < deadline, "backlog not drained"
        most_held = max(most_held, len(_held(worker)))
        most_in_flight = max(most_in_flight, _gpu_counts(stack)[1])
        time.sleep(0.1)
    assert most_held == 2 and most_in_flight <= 2, (most_held, most_in_flight)
    for uuid in uuids:
        assert [r.json()["status"] for r in settled_callbacks(stack, app_server, uuid, timeout=150)] == ["completed"]
        assert task_received(worker, uuid, "segment") == 1


def test_prompt_polling_is_version_guarded(monkeypatch: pytest.MonkeyPatch, moto_url: str) -> None:
    """samseg's Channel is written for kombu 5.7.0: on any other version (or with the switch off) it behaves as
    kombu's own — no prompt polling, no raw-queue handling."""
    import kombu
    from kombu import Connection

    from samseg.queue.transport import TRANSPORT

    def channel(prompt: bool) -> Any:
        options = {"region": "us-east-1", "samseg_prompt_polling": prompt, "samseg_raw_queues": ["jobs"]}
        url = moto_url.replace("http://", "sqs://k:s@")
        conn = Connection(url, transport=TRANSPORT, transport_options={**options, "is_secure": False})
        return conn.default_channel

    on = channel(True)
    assert on._samseg_fixed and on._samseg_prompt and on._samseg_raw_queues == {"jobs"}
    assert not channel(False)._samseg_prompt
    monkeypatch.setattr(kombu, "__version__", "5.8.0")
    other = channel(True)
    assert not other._samseg_fixed and not other._samseg_prompt


def test_gpu_worker_pool_warms_the_model_and_reports_ready(make_stack: Any) -> None:
    """Compose's GPU worker runs samseg's thread pool, which must send `worker_process_init` like solo does:
    that is where the model is loaded and warmed. Outcome: the worker logs `model_ready` and
    `samseg healthcheck worker` (compose's health check) passes — with Celery's plain threads pool neither
    would happen."""
    stack = make_stack(
        SAMSEG_PRELOAD_MODEL="true", SAMSEG_AMG_POINTS_PER_SIDE="2", SAMSEG_WORKER_HEARTBEAT_INTERVAL_SECONDS="1"
    )
    argv, env = _segment_command("compose", stack.env["SAMSEG_QUEUE_PREFIX"] + "gpu")
    worker = _start(stack, "gpu", argv, env)
    worker.wait_for_output('"model_ready"', 180)

    def healthy() -> bool:
        check = [str(VENV_BIN / "samseg"), "healthcheck", "worker"]
        return subprocess.run(check, env=stack.env, cwd=REPO, capture_output=True, timeout=30).returncode == 0

    wait_until(healthy, 30, "a healthy, warm GPU worker", interval=0.5)
    assert count_events(worker, "model_ready") == 1
