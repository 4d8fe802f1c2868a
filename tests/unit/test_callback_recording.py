"""An answer the job store could not take when it came is kept and recorded later (samseg.worker.outbox's
UnrecordedAttempts), on the real SQLite job store and a real (in-memory) Celery broker.

Mocked, because it cannot be real in the unit tier: the store's outage (the store refuses every call while
`down`, as tests/lifecycle_machine.py's FlakyBackend does). The clock is the lifecycle's injectable one, and the
tests call `record_all` themselves (the thread's own round is set to an hour), so nothing waits. The whole path,
with a worker and a store cut by a TCP proxy, is tests/system/test_faults_outages.py's
test_a_callback_answered_just_before_a_job_store_outage_is_recorded_after_it_and_sent_once.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from celery import Celery

from samseg.core.contracts import ErrorInfo, OutboxState, Stage
from samseg.stores.jobs import Decision, JobStore
from samseg.stores.lifecycle import SEND_RECLAIM_SECONDS, AttemptResult, Hold, Lifecycle, SendTicket
from samseg.stores.sql_jobs import SqlJobs
from samseg.worker import chain as names
from samseg.worker.outbox import RECORD_RETRY_SECONDS, UnrecordedAttempts
from tests.lifecycle_machine import GRACE, STALE, Clock, FlakyBackend, StoreDown, make_settings


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def flaky(tmp_path: Path) -> FlakyBackend:
    backend = SqlJobs(tmp_path / "jobs.sqlite", 14 * 86400)
    backend.ensure()
    return FlakyBackend(backend)


@pytest.fixture
def life(flaky: FlakyBackend, clock: Clock) -> Lifecycle:
    return Lifecycle(JobStore(flaky, STALE, GRACE), make_settings(), clock=clock)  # type: ignore[arg-type]


@pytest.fixture
def app() -> Iterator[Celery]:
    app = Celery("recording-test", broker="memory://", set_as_current=False)
    yield app
    app.close()


def ended_with_ticket(life: Lifecycle, clock: Clock) -> SendTicket:
    """A run failed by its download holder, and the first attempt of its callback under way."""
    claim = life.jobs.claim("job", "m-1", now=clock.now, payload={"uuid": "job"})
    assert claim.decision is Decision.RUN
    hold = life.start_stage("job", claim.run_id, Stage.DOWNLOAD, {"uuid": "job", "run_id": claim.run_id})
    assert isinstance(hold, Hold)
    assert life.fail("job", claim.run_id, ErrorInfo(code="model_error", message="boom"), token=hold.token)
    ticket = life.begin_send("job", claim.run_id)
    assert ticket is not None
    return ticket


def test_a_holder_retries_well_inside_the_reclaim_window() -> None:
    assert RECORD_RETRY_SECONDS * 5 <= SEND_RECLAIM_SECONDS


def test_a_503_answered_into_an_outage_is_recorded_once_the_store_is_back_and_its_next_attempt_queued(
    life: Lifecycle, flaky: FlakyBackend, clock: Clock, app: Celery
) -> None:
    clock.now = time.time()  # the next attempt's countdown is taken against the wall clock
    ticket = ended_with_ticket(life, clock)
    flaky.down = True
    result = AttemptResult(False, 503, "HTTP 503")
    with pytest.raises(StoreDown):
        life.record_attempt(ticket, result)
    recorder = UnrecordedAttempts(life, app, interval=3600)
    recorder.add(ticket, result)
    assert recorder.record_all() == 0 and recorder.pending() == 1  # still down: kept
    flaky.down = False
    assert recorder.record_all() == 1 and recorder.pending() == 0
    box = life.jobs.get("job").callback
    assert box is not None and box.state is OutboxState.PENDING and box.attempts == 1 and box.http_status == 503
    with app.connection_for_read() as connection:
        message = connection.SimpleQueue("celery").get(timeout=5)
        assert message.headers["task"] == names.DELIVER_CALLBACK and message.headers["eta"] is not None
        assert tuple(message.decode()[0]) == ("job", ticket.run_id)


def test_an_answer_whose_marker_was_taken_over_is_dropped_not_recorded(
    life: Lifecycle, flaky: FlakyBackend, clock: Clock, app: Celery
) -> None:
    """The store stayed unreachable to the holder for the whole reclaim window (a partition): the other attempt
    sent the callback again; the holder's late answer must not overwrite that attempt's marker."""
    ticket = ended_with_ticket(life, clock)
    flaky.down = True
    recorder = UnrecordedAttempts(life, app, interval=3600)
    recorder.add(ticket, AttemptResult(True, 200))
    clock.now = ticket.marker + 1
    flaky.down = False
    assert life.begin_send("job", ticket.run_id) is None  # opens the window
    clock.now += SEND_RECLAIM_SECONDS + 1
    again = life.begin_send("job", ticket.run_id)
    assert again is not None and again.attempt == ticket.attempt  # the first attempt was never recorded
    assert recorder.record_all() == 1 and recorder.pending() == 0
    box = life.jobs.get("job").callback
    assert box is not None and box.state is OutboxState.SENDING and box.sending_until == again.marker
