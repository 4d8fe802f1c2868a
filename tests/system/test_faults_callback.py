"""Fault injection at samseg's outputs and in the model, against the real running system (issue 3).

The app server misbehaves (refuses connections, 5xx, 429 with Retry-After, hangs, rejects with 4xx) while
real `celery -A samseg worker` processes run real SAM-2 jobs (random weights, see conftest); the tests
assert the callback's retry schedule as the app server saw it, the job status the API reports, and that
the masks stay available. The out-of-memory tests inject a CUDA OOM inside the worker process via
tests/faults/sitecustomize.py — the one in-process fault in this suite, since a CPU-only machine cannot
run out of GPU memory.

Stacks are module-scoped and serve many jobs (one uuid per case) to amortise worker start-up and model
loading; helpers are shared with tests/system/test_faults_input.py.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from tests.faults_support import wait_drained
from tests.support import REPO, LoopbackServer, Recorded, Route, free_port
from tests.system.test_faults_input import (
    Deployment,
    deployment,
    dump_logs_on_failure,  # noqa: F401  (autouse fixture: worker logs on failure)
    patches,
    raw_get,
    wait_callback,
    wait_status,
)

pytestmark = pytest.mark.slow

JOB_TIMEOUT = 300  # seven SAM-2 jobs share two CPU cores with whatever else runs here
MAX_ATTEMPTS, BACKOFF, BACKOFF_CAP, CALLBACK_TIMEOUT = 4, 0.2, 1.0, 2.0
SLACK = 0.75  # scheduling, the PATCH itself, a loaded machine
FAULTS_DIR = Path(__file__).resolve().parents[1] / "faults"

CALLBACK_ENV = {
    "SAMSEG_CALLBACK_MAX_ATTEMPTS": str(MAX_ATTEMPTS),
    "SAMSEG_CALLBACK_BACKOFF_SECONDS": str(BACKOFF),
    "SAMSEG_CALLBACK_BACKOFF_MAX_SECONDS": str(BACKOFF_CAP),
    "SAMSEG_CALLBACK_TIMEOUT_SECONDS": str(CALLBACK_TIMEOUT),
}


class Script:
    """A callable app-server route: answers attempt n with routes[n] (the last one repeats) and stamps
    when each request arrived (before any delay), so a test can measure the gaps between attempts."""

    def __init__(self, *routes: Route) -> None:
        self.routes = routes
        self.times: list[float] = []
        self._lock = threading.Lock()

    def __call__(self, record: Recorded) -> Route:
        with self._lock:
            self.times.append(time.monotonic())
            return self.routes[min(len(self.times), len(self.routes)) - 1]

    def gaps(self) -> list[float]:
        return [b - a for a, b in zip(self.times, self.times[1:], strict=False)]


JSON_OK = Route(200, b"{}", {"Content-Type": "application/json"})

# uuid → the app server's behaviour for that job's callback.
SCRIPTS: dict[str, Script] = {
    "cb-always-500": Script(Route(500, b"internal error")),
    # Every transient status in one delivery (one SAM-2 job instead of four): 503, 502, 504 and 408.
    "cb-always-transient": Script(Route(503, b"unavailable"), Route(502), Route(504), Route(408, b"timeout")),
    "cb-429-retry-after": Script(
        Route(429, b"slow down", {"Retry-After": "1"}), Route(429, b"", {"Retry-After": "3600"})
    ),
    "cb-hangs": Script(Route(200, b"{}", delay=CALLBACK_TIMEOUT + 1.5)),
    "cb-500-then-200": Script(Route(500, b"internal error"), JSON_OK),
    "cb-400": Script(Route(400, b'{"detail": "bad body"}')),
    "cb-404": Script(Route(404, b'{"detail": "no such image"}')),
    "cb-422": Script(Route(422, b'{"detail": "unprocessable"}')),
}


# --- fixtures -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def app() -> Iterator[LoopbackServer]:
    server = LoopbackServer()
    server.default = JSON_OK
    yield server
    server.close()


@pytest.fixture(scope="module")
def cb(moto_url, tiny_checkpoint, tmp_path_factory, app, images) -> Iterator[Deployment]:  # type: ignore[no-untyped-def]
    """Worker + API whose callbacks go to the scripted app server; every scripted job is published at once."""
    for uuid, script in SCRIPTS.items():
        app.routes["/api/v1/re-imagine/auto-mask/" + uuid] = script
    with deployment(
        moto_url,
        tiny_checkpoint,
        tmp_path_factory.mktemp("faults-callback"),
        api=True,
        worker_args=("-c", "2"),
        SAMSEG_APP_SERVER_URL=app.url,
        OMP_NUM_THREADS="1",  # two pool children on two cores: one torch thread each, no oversubscription
        SAMSEG_AMG_POINTS_PER_SIDE="2",  # 4 prompts: the masks only need to exist here
        **CALLBACK_ENV,
    ) as dep:
        for uuid in SCRIPTS:
            dep.stack.send_raw(json.dumps({"uuid": uuid, "image_url": images.url + "/ok.png"}))
        yield dep


def final_status(dep: Deployment, app: LoopbackServer, uuid: str) -> dict[str, Any]:
    """The job's status once its callback outbox closed (first attempt seen, then the outbox delivered or given
    up): no attempt can follow a closed outbox, so counting attempts afterwards needs no waiting."""
    wait_callback(app, uuid, JOB_TIMEOUT)
    job = wait_status(dep.api, uuid, timeout=60)
    # And no copy of any stage (a redelivery) is left to run; the deployment's jobs all run at once, so this
    # waits for the last of them.
    wait_drained(dep.stack, timeout=JOB_TIMEOUT)
    return job


def assert_masks_served(dep: Deployment, uuid: str) -> None:
    assert dep.api is not None
    status, png = raw_get(dep.api, f"/assets/{uuid}/mask_images/mask_000.png")
    assert status == 200 and png.startswith(b"\x89PNG"), status
    status, result = raw_get(dep.api, f"/assets/{uuid}/result.json")
    assert status == 200 and json.loads(result)["status"] == "completed"


# --- 1. transient app-server faults: retried, bounded, then callback_failed ------------------------------


@pytest.mark.parametrize(
    ("uuid", "http_status"),
    [("cb-always-500", 500), ("cb-always-transient", 408), ("cb-429-retry-after", 429), ("cb-hangs", None)],
)
def test_transient_callback_failures_are_retried_then_reported(uuid, http_status, cb, app):
    """Fault: the app server answers every callback for the job with 500 / 503, 502, 504, 408 in turn / 429
    (Retry-After: 1, then Retry-After: 3600) / nothing within SAMSEG_CALLBACK_TIMEOUT_SECONDS=2 (it answers
    after 3.5 s).

    Asserts: exactly SAMSEG_CALLBACK_MAX_ATTEMPTS=4 attempts (each its own task), all with the same `completed`
    body; the gaps between attempts follow the backoff (full jitter: gap k ≤ min(cap=1 s, 0.2·2^k) + the request
    and the hop through SQS; Retry-After honoured — ≥ 1 s — and capped at 1 s; a hang costs the 2 s timeout per
    attempt); then GET /jobs/{uuid} is `completed` (the masks were published) with the outbox `expired`,
    `callback_failed` as its error, `callback.attempts == 4`, the last HTTP status; the masks are still served.
    """
    job = final_status(cb, app, uuid)
    attempts = patches(app, uuid)
    assert len(attempts) == MAX_ATTEMPTS, [r.path for r in attempts]
    bodies = [r.json() for r in attempts]
    assert all(b == bodies[0] for b in bodies) and bodies[0]["status"] == "completed"

    assert job["status"] == "completed" and job["error"]["code"] == "callback_failed", job
    assert job["callback"]["state"] == "expired", job["callback"]
    assert job["callback"]["attempts"] == MAX_ATTEMPTS and job["callback"]["delivered"] is False
    assert job["callback"].get("http_status") == http_status
    assert len(job["segments"]) > 0  # the result is kept in the status, too
    assert_masks_served(cb, uuid)

    gaps = SCRIPTS[uuid].gaps()
    assert len(gaps) == MAX_ATTEMPTS - 1
    # Each attempt is its own task: what samseg chose is the wait it logged (next_attempt_at); what the app server
    # saw is that wait plus the hop through SQS and a free worker slot (load-dependent, so only bounded below).
    waits = chosen_waits(cb, uuid)
    assert len(waits) == MAX_ATTEMPTS - 1, waits
    assert all(gap >= wait - 0.1 for gap, wait in zip(gaps, waits, strict=True)), (gaps, waits)
    if http_status in (500, 408):
        for k, wait in enumerate(waits):
            assert 0 <= wait <= min(BACKOFF_CAP, BACKOFF * 2**k) + 0.05, waits
    elif http_status == 429:
        assert all(1.0 - 0.05 <= wait <= BACKOFF_CAP + 0.05 for wait in waits), waits  # honoured, and capped
    else:
        assert all(gap >= CALLBACK_TIMEOUT - 0.05 for gap in gaps), gaps
        assert "Timeout" in job["callback"]["error"], job["callback"]  # httpx.ReadTimeout


def chosen_waits(dep: Deployment, uuid: str) -> list[float]:
    """The wait before the next attempt that each non-final attempt scheduled (from its `callback_attempt` log)."""
    tries = [e for e in dep.events() if e.get("event") == "callback_attempt" and e.get("job_uuid") == uuid]
    return [e["next_attempt_at"] - _logged_at(e) for e in tries if e.get("next_attempt_at") is not None]


def _logged_at(event: dict[str, Any]) -> float:
    return datetime.fromisoformat(str(event["timestamp"]).replace("Z", "+00:00")).timestamp()


def test_callback_delivered_after_a_transient_failure(cb, app):
    """Fault: the app server answers the first callback with 500, then accepts.

    Asserts: delivered on attempt 2, no attempt after the 200; GET /jobs/{uuid} is `completed` with
    callback.delivered, attempts == 2 and http_status 200.
    """
    uuid, attempts = "cb-500-then-200", 2
    job = final_status(cb, app, uuid)
    assert len(patches(app, uuid)) == attempts
    assert job["status"] == "completed" and "error" not in job, job
    callback = job["callback"]
    assert (callback["state"], callback["delivered"], callback["attempts"], callback["http_status"]) == (
        "delivered",
        True,
        attempts,
        200,
    )
    assert_masks_served(cb, uuid)


# --- 2. permanent rejections: not retried ---------------------------------------------------------------


@pytest.mark.parametrize("code", [400, 404, 422])
def test_callback_rejected_with_4xx_is_not_retried(code, cb, app):
    """Fault: the app server rejects the callback with 400 / 404 / 422.

    Asserts: exactly one request (no retry: the outbox is closed `rejected`); GET /jobs/{uuid} is `completed`
    with `callback_failed` as its error, callback.http_status == the code and attempts == 1; the worker logged
    `callback_rejected` with that status for this job; the masks are still served.
    """
    uuid = f"cb-{code}"
    job = final_status(cb, app, uuid)
    assert len(patches(app, uuid)) == 1
    assert job["status"] == "completed" and job["error"]["code"] == "callback_failed", job
    assert job["callback"]["state"] == "rejected", job["callback"]
    assert job["callback"]["http_status"] == code and job["callback"]["attempts"] == 1
    assert job["callback"]["delivered"] is False
    rejected = [e for e in cb.events() if e.get("event") == "callback_rejected" and e.get("job_uuid") == uuid]
    assert len(rejected) == 1 and rejected[0]["http_status"] == code, rejected
    assert_masks_served(cb, uuid)


# --- 1b. the app server is down: connections refused ----------------------------------------------------


@pytest.fixture(scope="module")
def refused(moto_url, tiny_checkpoint, tmp_path_factory, images) -> Iterator[Deployment]:  # type: ignore[no-untyped-def]
    closed = free_port()  # bound and released: nothing listens there
    with deployment(
        moto_url,
        tiny_checkpoint,
        tmp_path_factory.mktemp("faults-callback-refused"),
        api=True,
        worker_args=("-c", "1"),
        SAMSEG_APP_SERVER_URL=f"http://127.0.0.1:{closed}",
        SAMSEG_AMG_POINTS_PER_SIDE="2",
        **CALLBACK_ENV,
    ) as dep:
        yield dep


def test_app_server_refusing_connections(refused, images):
    """Fault: SAMSEG_APP_SERVER_URL points at a closed port (connection refused on every attempt).

    Asserts: the job is `completed` with `callback_failed` and its outbox `expired`, callback.attempts == 4
    (every attempt made, each its own task, none answered: no http_status), the error names the connection
    failure, each attempt's wait before the next is within the backoff cap, and the masks are still served.
    (The attempts themselves cannot be counted on the app-server side: nothing is listening.)
    """
    uuid = "cb-refused"
    refused.stack.send_raw(json.dumps({"uuid": uuid, "image_url": images.url + "/ok.png"}))
    deadline = time.monotonic() + JOB_TIMEOUT
    while not any(e.get("event") == "job_finished" and e.get("job_uuid") == uuid for e in refused.events()):
        assert time.monotonic() < deadline, "job not finished"
        time.sleep(0.5)
    job = wait_status(refused.api, uuid)
    assert job["status"] == "completed" and job["error"]["code"] == "callback_failed", job
    assert job["callback"]["state"] == "expired", job["callback"]
    assert job["callback"]["attempts"] == MAX_ATTEMPTS and job["callback"]["delivered"] is False
    assert job["callback"].get("http_status") is None
    assert "ConnectError" in job["callback"]["error"], job["callback"]
    tries = [e for e in refused.events() if e.get("event") == "callback_attempt" and e.get("job_uuid") == uuid]
    assert [(e["attempt"], e["outbox"]) for e in tries] == [
        (1, "pending"),
        (2, "pending"),
        (3, "pending"),
        (4, "expired"),
    ]
    assert all(wait <= BACKOFF_CAP + 0.05 for wait in chosen_waits(refused, uuid))
    assert_masks_served(refused, uuid)


# --- 3. the model runs out of memory (injected inside the worker) --------------------------------------


def oom_deployment(moto_url, tiny_checkpoint, root, app, limit: int):  # type: ignore[no-untyped-def]
    return deployment(
        moto_url,
        tiny_checkpoint,
        root,
        api=False,
        worker_args=("-c", "1"),
        SAMSEG_APP_SERVER_URL=app.url,
        SAMSEG_AMG_POINTS_PER_SIDE="4",  # 16 prompts: one batch of 16, then four of 4 after the fallback
        SAMSEG_AMG_POINTS_PER_BATCH="16",
        SAMSEG_TEST_FAULT=f"oom_above_batch:{limit}",
        PYTHONPATH=f"{FAULTS_DIR}:{REPO}",
        **CALLBACK_ENV,
    )


def injected(dep: Deployment) -> list[str]:
    marker = "samseg_test_fault_injected"
    return [line[line.index(marker) :].split('"')[0] for line in dep.worker.output().splitlines() if marker in line]


def test_out_of_memory_retries_with_a_quarter_of_the_batch(moto_url, tiny_checkpoint, tmp_path_factory, app, images):
    """Fault (injected inside the worker process — the only such fault in this suite, because a GPU
    out-of-memory cannot happen on this CPU-only machine): tests/faults/sitecustomize.py makes every prompt
    batch larger than 8 that the mask generator decodes raise torch.OutOfMemoryError("CUDA out of memory
    (injected)") (hooked at SAM-2's PromptEncoder.forward, which both generator implementations call once per
    batch); SAMSEG_AMG_POINTS_PER_BATCH=16 and a 4x4 grid, so the first attempt decodes one batch of 16.

    Asserts: the first attempt hits the OOM, the worker logs `segment_out_of_memory` with points_per_batch=16
    and retry_with=4, the retry at 16 // 4 = 4 succeeds and the app server gets a `completed` callback with
    masks, which are on disk.
    """
    with oom_deployment(moto_url, tiny_checkpoint, tmp_path_factory.mktemp("faults-oom-a"), app, limit=8) as dep:
        uuid = "oom-retry-ok"
        dep.stack.send_raw(json.dumps({"uuid": uuid, "image_url": images.url + "/ok.png"}))
        body = wait_callback(app, uuid, JOB_TIMEOUT)
        assert body["status"] == "completed" and len(body["segments"]) > 0, body
        faults = injected(dep)
        assert faults and all(f.startswith("samseg_test_fault_injected batch=16 limit=8") for f in faults), faults
        ooms = [e for e in dep.events() if e.get("event") == "segment_out_of_memory" and e.get("job_uuid") == uuid]
        assert len(ooms) == 1, ooms
        assert ooms[0]["points_per_batch"] == 16 and ooms[0]["retry_with"] == 4
        assert "CUDA out of memory (injected)" in ooms[0]["error"]
        assert (dep.assets / uuid / "mask_images" / "mask_000.png").is_file()
        dep.assert_worker_healthy()


def test_out_of_memory_twice_fails_the_job_and_the_worker_lives_on(
    moto_url, tiny_checkpoint, tmp_path_factory, app, images
):
    """Fault (injected inside the worker process, as above — a GPU OOM cannot exist on this machine): every
    prompt batch larger than 1 raises torch.OutOfMemoryError, so both the first attempt (16) and the retry
    (16 // 4 = 4) run out of memory.

    Asserts: a `failed` callback with code `model_out_of_memory` naming both batch sizes, no job folder and no
    work files left; the
    worker process and its pool child survive (no WorkerLostError, no restart: the same child pid hit the
    fault both times) and answer a second job, which fails the same way.
    """
    with oom_deployment(moto_url, tiny_checkpoint, tmp_path_factory.mktemp("faults-oom-b"), app, limit=1) as dep:
        for n, uuid in enumerate(("oom-fails-1", "oom-fails-2"), start=1):
            dep.stack.send_raw(json.dumps({"uuid": uuid, "image_url": images.url + "/ok.png"}))
            body = wait_callback(app, uuid, JOB_TIMEOUT)
            assert body["status"] == "failed" and body["segments"] == [], body
            assert body["error"]["code"] == "model_out_of_memory", body["error"]
            assert "points_per_batch=16 and again at 4" in body["error"]["message"]
            assert not (dep.assets / uuid).exists()
            assert not (dep.assets / ".samseg" / "work" / uuid).exists()  # the errback dropped the work files
            dep.assert_worker_healthy()
            ooms = [e for e in dep.events() if e.get("event") == "segment_out_of_memory"]
            assert len(ooms) == n and ooms[-1]["job_uuid"] == uuid
        faults = injected(dep)
        assert sorted({f.split()[1] for f in faults}) == ["batch=16", "batch=4"], faults
        assert len({f.split("pid=")[1] for f in faults}) == 1, faults  # one pool child throughout
