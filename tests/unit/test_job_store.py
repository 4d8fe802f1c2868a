"""The job store's guarantees under real concurrency, on SQLite (a real file): threads race on one uuid, the
way several ingress consumers and stage workers do in production. Nothing of samseg is mocked.

The same cases run against DynamoDB (moto's server on loopback) in tests/integration/test_job_store_dynamodb.py,
which also races separate processes on both backends.
"""

from __future__ import annotations

import random
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from samseg.core.contracts import CallbackStatus, ErrorInfo, JobState, Stage
from samseg.stores.dynamo_jobs import DynamoJobs
from samseg.stores.jobs import PUBLISH_LEASE_SECONDS, Decision, JobBackend, JobStore
from samseg.stores.sql_jobs import SqlJobs

STALE = 600.0
DAY = 86400.0
STAGES = [Stage.DOWNLOAD, Stage.SEGMENT, Stage.PERSIST, Stage.NOTIFY]


def dynamo_client(moto_url: str):  # type: ignore[no-untyped-def]
    import boto3

    return boto3.client(
        "dynamodb",
        endpoint_url=moto_url,
        region_name="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )


def make_backend(kind: str, where: str) -> JobBackend:
    """Builds a backend from plain strings, so a child process can build its own."""
    if kind == "sqlite":
        return SqlJobs(Path(where), DAY)
    moto_url, table = where.split("|")
    return DynamoJobs(dynamo_client(moto_url), table, DAY)


@pytest.fixture
def target(tmp_path: Path) -> tuple[str, str]:
    """(backend kind, where): SQLite here; tests/integration/test_job_store_dynamodb.py overrides it."""
    return "sqlite", str(tmp_path / "jobs.sqlite")


@pytest.fixture
def store(target: tuple[str, str]) -> Iterator[JobStore]:
    jobs = JobStore(make_backend(*target), STALE)
    jobs.ensure()
    yield jobs


def _race(count: int, action: Callable[[int], object]) -> list[object]:
    """Run `action(i)` for i in range(count) on `count` threads released at the same instant."""
    barrier = threading.Barrier(count)

    def run(i: int) -> object:
        barrier.wait()
        return action(i)

    with ThreadPoolExecutor(max_workers=count) as pool:
        return list(pool.map(run, range(count)))


# --- claims -------------------------------------------------------------------------------------------------
def test_many_threads_claiming_one_uuid_get_exactly_one_run(store):
    claims = _race(16, lambda i: store.claim("job-a", f"message-{i}"))
    decisions = Counter(c.decision for c in claims)  # type: ignore[attr-defined]
    assert decisions[Decision.RUN] == 1, decisions
    assert decisions[Decision.DUPLICATE] == 15
    (winner,) = [c for c in claims if c.decision is Decision.RUN]  # type: ignore[attr-defined]
    assert store.get("job-a").run_id == winner.run_id


def test_the_same_message_delivered_twice_at_once_yields_one_run(store):
    claims = _race(8, lambda i: store.claim("job-m", "one-message-id"))
    decisions = Counter(c.decision for c in claims)  # type: ignore[attr-defined]
    assert decisions == {Decision.RUN: 1, Decision.BUSY: 7}
    run_id = next(c.run_id for c in claims if c.decision is Decision.RUN)  # type: ignore[attr-defined]
    assert store.mark_published("job-m", run_id)
    again = store.claim("job-m", "one-message-id")
    assert again.decision is Decision.ALREADY_PUBLISHED and again.run_id == run_id


def test_a_publisher_that_died_before_publishing_is_resumed_by_the_next_delivery(store):
    first = store.claim("job-r", "msg", now=1000.0)
    assert store.claim("job-r", "msg", now=1000.0 + PUBLISH_LEASE_SECONDS - 1).decision is Decision.BUSY
    resumed = store.claim("job-r", "msg", now=1000.0 + PUBLISH_LEASE_SECONDS + 1)
    assert resumed.decision is Decision.RUN and resumed.run_id == first.run_id


def test_failed_and_stale_runs_are_taken_over_completed_and_live_ones_are_not(store):
    now = time.time()
    first = store.claim("job-t", "m1", now=now)
    assert store.advance("job-t", first.run_id, JobState.RUNNING, Stage.SEGMENT, now=now)
    assert store.claim("job-t", "m2", now=now + 1).decision is Decision.DUPLICATE  # live
    stale = store.claim("job-t", "m3", now=now + STALE + 1)  # no progress for longer than any stage may take
    assert stale.decision is Decision.RUN and stale.run_id != first.run_id
    assert store.advance("job-t", stale.run_id, JobState.FAILED, error=ErrorInfo(code="x", message="y"))
    rerun = store.claim("job-t", "m4")
    assert rerun.decision is Decision.RUN and rerun.run_id not in (first.run_id, stale.run_id)
    assert store.advance("job-t", rerun.run_id, JobState.COMPLETED)
    # The same job again after it completed: no new run, the same run's callback again (the re-send rules).
    again = store.claim("job-t", "m5")
    assert again.decision is Decision.REDELIVER and again.run_id == rerun.run_id
    assert again.record.status is JobState.COMPLETED and again.record.callback is not None
    assert again.record.callback.open  # reopened: the outbox sends the run's body once more
    assert store.claim("job-t", "m6").decision is Decision.DUPLICATE  # …while that callback is on its way


def test_the_resend_rules_follow_the_fingerprint(store):
    """Same body while active: duplicate; another body while active: conflict (record untouched); same body after
    completed: redeliver; another body after completed, or anything after failed/canceled: a new run."""
    now = time.time()
    first = store.claim("job-r", "m1", now=now, fingerprint="A")
    assert store.advance("job-r", first.run_id, JobState.RUNNING, Stage.SEGMENT, now=now)
    before = store.get("job-r")
    assert store.claim("job-r", "m2", now=now + 1, fingerprint="A").decision is Decision.DUPLICATE
    conflict = store.claim("job-r", "m3", now=now + 1, fingerprint="B")
    assert conflict.decision is Decision.CONFLICT and store.get("job-r") == before
    assert store.advance("job-r", first.run_id, JobState.COMPLETED, now=now + 2)
    assert store.claim("job-r", "m4", now=now + 3, fingerprint="A").decision is Decision.REDELIVER
    other = store.claim("job-r", "m5", now=now + 4, fingerprint="B")
    assert other.decision is Decision.RUN and other.run_id != first.run_id and other.record.fingerprint == "B"
    assert store.advance("job-r", other.run_id, JobState.CANCELED, now=now + 5)
    assert store.claim("job-r", "m6", now=now + 6, fingerprint="B").decision is Decision.RUN


def test_racing_takeovers_of_a_failed_run_give_one_new_run(store):
    first = store.claim("job-f", "m0")
    assert store.advance("job-f", first.run_id, JobState.FAILED, error=ErrorInfo(code="x", message="y"))
    claims = _race(12, lambda i: store.claim("job-f", f"resend-{i}"))
    assert Counter(c.decision for c in claims)[Decision.RUN] == 1  # type: ignore[attr-defined]


# --- status writes --------------------------------------------------------------------------------------------
def test_a_write_for_a_replaced_run_is_refused(store):
    old = store.claim("job-s", "m1")
    assert store.advance("job-s", old.run_id, JobState.FAILED, error=ErrorInfo(code="x", message="y"))
    new = store.claim("job-s", "m2")
    assert store.advance("job-s", new.run_id, JobState.RUNNING, Stage.DOWNLOAD)
    # The old run's late notify must not overwrite the new run's status.
    callback = CallbackStatus(delivered=True, attempts=1)
    assert not store.advance(
        "job-s", old.run_id, JobState.FAILED, error=ErrorInfo(code="x", message="y"), callback=callback
    )
    assert not store.advance("job-s", old.run_id, JobState.RUNNING, Stage.NOTIFY)
    record = store.get("job-s")
    assert (record.run_id, record.status, record.stage) == (new.run_id, JobState.RUNNING, Stage.DOWNLOAD)


def test_post_jobs_placeholder_never_overwrites_a_record(store):
    claim = store.claim("job-q", "m1")
    assert store.advance("job-q", claim.run_id, JobState.RUNNING, Stage.SEGMENT)
    assert not store.create_queued("job-q")
    record = store.get("job-q")
    assert (record.status, record.stage, record.run_id) == (JobState.RUNNING, Stage.SEGMENT, claim.run_id)
    # A placeholder for an unknown uuid is taken over by the ingress's claim.
    assert store.create_queued("job-new")
    assert store.get("job-new").run_id is None
    assert store.claim("job-new", "m").decision is Decision.RUN


def test_statuses_never_go_backwards_under_concurrent_writes(store):
    claim = store.claim("job-o", "m1")
    run_id = claim.run_id
    moves = [(JobState.RUNNING, s) for s in STAGES] * 6 + [(JobState.COMPLETED, None)] * 2
    random.Random(7).shuffle(moves)
    seen: list[int] = []
    done = threading.Event()

    def observe() -> None:
        while not done.is_set():
            record = store.get("job-o")
            seen.append(record.rank)

    watcher = threading.Thread(target=observe)
    watcher.start()
    accepted = _race(len(moves), lambda i: store.advance("job-o", run_id, moves[i][0], moves[i][1]))
    done.set()
    watcher.join()
    assert seen == sorted(seen), "an observer saw the status go backwards"
    record = store.get("job-o")
    assert record.status is JobState.COMPLETED and record.finished_at is not None
    assert any(accepted)
    # Once completed, nothing moves it: not a stage, not failed.
    assert not store.advance("job-o", run_id, JobState.RUNNING, Stage.NOTIFY)
    assert not store.advance("job-o", run_id, JobState.FAILED, error=ErrorInfo(code="x", message="y"))
    # …but the same terminal state may record the callback's delivery.
    assert store.advance("job-o", run_id, JobState.COMPLETED, callback=CallbackStatus(delivered=True, attempts=2))
    assert store.get("job-o").callback.attempts == 2


def test_impossible_state_stage_pairs_are_refused_before_the_store(store):
    claim = store.claim("job-i", "m")
    with pytest.raises(ValueError):
        store.advance("job-i", claim.run_id, JobState.QUEUED, Stage.SEGMENT)


# --- purge index ----------------------------------------------------------------------------------------------
def test_purge_index_lists_finished_unpurged_jobs_oldest_first_and_forgets_purged_ones(store):
    now = time.time()
    finished = []
    for i, age in enumerate([300, 100, 200]):
        claim = store.claim(f"done-{i}", f"m{i}", now=now - age)
        assert store.advance(f"done-{i}", claim.run_id, JobState.COMPLETED, now=now - age)
        finished.append(f"done-{i}")
    live = store.claim("live", "m")
    assert store.advance("live", live.run_id, JobState.RUNNING, Stage.SEGMENT, now=now - 500)
    page = _eventually(lambda: store.finished_before(now - 150, 10), 2)
    assert [r.uuid for r in page] == ["done-0", "done-2"]
    assert store.mark_purged(page[0])
    assert [r.uuid for r in _eventually(lambda: store.finished_before(now - 150, 10), 1)] == ["done-2"]
    record = store.get("done-0")
    assert record.assets_purged and record.status is JobState.COMPLETED  # the status outlives the assets


def test_marking_purged_is_refused_once_the_job_was_re_run(store):
    first = store.claim("job-x", "m1")
    store.advance("job-x", first.run_id, JobState.FAILED, error=ErrorInfo(code="x", message="y"))
    (candidate,) = _eventually(lambda: store.finished_before(time.time() + 1, 10), 1)
    store.claim("job-x", "m2")  # re-run between the purge's read and its write
    assert not store.mark_purged(candidate)


def _eventually(read: Callable[[], list], count: int, timeout: float = 10.0) -> list:  # type: ignore[type-arg]
    """DynamoDB's secondary indexes are eventually consistent: read until the expected count shows."""
    deadline = time.monotonic() + timeout
    while True:
        rows = read()
        if len(rows) == count or time.monotonic() > deadline:
            return rows
        time.sleep(0.1)
