"""Issue 15's scenarios, each as the lifecycle (samseg.stores.lifecycle) answers it on a real SQLite job store.

Each of these passed through a gap of the previous design (an `enter` that accepted the same stage again, a
`fail_run` from any rank, callbacks retried for ~90 s inside one task, a claim that only its own message could
take over, no sweeper); the property-based run in test_lifecycle_properties.py covers their interleavings.
The clock is the lifecycle's injectable one: no test waits.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from samseg.core.contracts import ErrorInfo, JobState, OutboxState, Stage
from samseg.stores.jobs import PUBLISH_LEASE_SECONDS, Decision, JobStore
from samseg.stores.lifecycle import (
    SEND_RECLAIM_SECONDS,
    AttemptResult,
    Busy,
    CancelOutcome,
    Ended,
    Forward,
    Gone,
    Hold,
    Lifecycle,
    Step,
    SweepKind,
)
from samseg.stores.sql_jobs import SqlJobs
from tests.lifecycle_machine import GRACE, LEASE, STALE, Clock, make_settings

ERROR = ErrorInfo(code="model_error", message="boom")


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def life(tmp_path: Path, clock: Clock) -> Lifecycle:
    backend = SqlJobs(tmp_path / "jobs.sqlite", 14 * 86400)
    backend.ensure()
    return Lifecycle(JobStore(backend, STALE, GRACE), make_settings(), clock=clock)


def started(life: Lifecycle, clock: Clock, uuid: str = "job") -> str:
    claim = life.jobs.claim(uuid, f"m-{uuid}", now=clock.now, payload={"uuid": uuid})
    assert claim.decision is Decision.RUN
    life.jobs.mark_published(uuid, claim.run_id, now=clock.now)
    return claim.run_id


def through(life: Lifecycle, uuid: str, run_id: str, *stages: Stage) -> None:
    for stage in stages:
        hold = life.start_stage(uuid, run_id, stage, {"uuid": uuid, "run_id": run_id})
        assert isinstance(hold, Hold), hold
        assert life.hand_off(uuid, run_id, hold.token, {"uuid": uuid, "run_id": run_id})


# --- 2. two copies of one stage -------------------------------------------------------------------------------
def test_a_second_copy_of_a_running_stage_is_busy_and_can_neither_fail_nor_hand_off(life: Lifecycle, clock: Clock):
    run = started(life, clock)
    first = life.start_stage("job", run, Stage.DOWNLOAD, {"uuid": "job", "run_id": run})
    assert isinstance(first, Hold)
    second = life.start_stage("job", run, Stage.DOWNLOAD, {"uuid": "job", "run_id": run})
    assert isinstance(second, Busy) and 0 < second.retry_in <= LEASE
    # A copy without the token (the old `fail_run` from any rank) cannot end the run.
    assert not life.fail("job", run, ERROR, token="not-the-holder")
    assert life.hand_off("job", run, first.token, {"uuid": "job", "run_id": run})
    # The duplicate, delivered again after the stage finished but before the next one started, republishes the
    # next stage (its message may be lost: the holder died between the hand-off and the publish)…
    forward = life.start_stage("job", run, Stage.DOWNLOAD, {})
    assert isinstance(forward, Forward) and forward.stage is Stage.SEGMENT and forward.payload["run_id"] == run
    # …and once the next stage started, ends quietly.
    assert isinstance(life.start_stage("job", run, Stage.SEGMENT, {"uuid": "job", "run_id": run}), Hold)
    assert isinstance(life.start_stage("job", run, Stage.DOWNLOAD, {}), Gone)


def test_a_copy_whose_lease_ran_out_loses_the_run_to_the_next_copy(life: Lifecycle, clock: Clock):
    run = started(life, clock)
    through(life, "job", run, Stage.DOWNLOAD, Stage.SEGMENT)
    slow = life.start_stage("job", run, Stage.PERSIST, {"uuid": "job", "run_id": run})
    assert isinstance(slow, Hold)
    clock.now += LEASE + 1  # the holder stopped renewing (an outage, a stuck process)
    fresh = life.start_stage("job", run, Stage.PERSIST, {"uuid": "job", "run_id": run})
    assert isinstance(fresh, Hold) and fresh.token != slow.token
    assert not life.renew("job", run, slow.token)
    assert not life.fail("job", run, ERROR, token=slow.token)  # the loser never fails the run…
    assert not life.hand_off("job", run, slow.token, {})  # …nor publishes the next stage
    assert life.hand_off("job", run, fresh.token, {"uuid": "job", "run_id": run})
    notify = life.start_stage("job", run, Stage.NOTIFY, {"uuid": "job", "run_id": run})
    assert isinstance(notify, Hold) and life.complete("job", run, notify.token)
    record = life.jobs.get("job")
    assert record is not None and record.status is JobState.COMPLETED


def test_a_published_run_is_never_failed(life: Lifecycle, clock: Clock):
    run = started(life, clock)
    through(life, "job", run, Stage.DOWNLOAD, Stage.SEGMENT, Stage.PERSIST)
    notify = life.start_stage("job", run, Stage.NOTIFY, {"uuid": "job", "run_id": run})
    assert isinstance(notify, Hold)
    assert not life.fail("job", run, ERROR, token=notify.token)  # its masks are published: it can only complete
    assert life.fail(
        "job", run, ErrorInfo(code="result_missing", message="gone"), token=notify.token, result_missing=True
    )


# --- 4. failing is as durable as succeeding ----------------------------------------------------------------------
def test_ending_a_run_opens_its_callback_outbox_in_the_same_write(life: Lifecycle, clock: Clock):
    run = started(life, clock)
    hold = life.start_stage("job", run, Stage.DOWNLOAD, {"uuid": "job", "run_id": run})
    assert isinstance(hold, Hold) and life.fail("job", run, ERROR, token=hold.token)
    record = life.jobs.get("job")
    assert record is not None and record.status is JobState.FAILED
    assert record.callback is not None and record.callback.state is OutboxState.PENDING
    assert record.sweep_due is not None  # if the attempt's message is lost, the sweeper queues another


def test_the_reaper_fails_a_stage_only_once_its_holder_is_gone(life: Lifecycle, clock: Clock):
    run = started(life, clock)
    assert isinstance(life.start_stage("job", run, Stage.SEGMENT, {"uuid": "job", "run_id": run}), Hold)
    lost = ErrorInfo(code="worker_lost", message="killed")
    assert not life.fail("job", run, lost, stage=Stage.SEGMENT, lease_expired=True)
    clock.now += LEASE + 1
    assert life.fail("job", run, lost, stage=Stage.SEGMENT, lease_expired=True)


# --- 5. nothing waits on a lost message ---------------------------------------------------------------------------
def test_a_claim_whose_chain_was_never_published_is_republished_by_the_sweeper(life: Lifecycle, clock: Clock):
    claim = life.jobs.claim("job", "m1", now=clock.now, payload={"uuid": "job", "image_url": "https://x/a.png"})
    assert claim.decision is Decision.RUN  # …and its consumer died before publishing the chain
    assert life.sweep() == []
    clock.now += PUBLISH_LEASE_SECONDS + GRACE + 1
    (action,) = life.sweep()
    assert (action.kind, action.stage, action.run_id) == (SweepKind.REPUBLISH, Stage.DOWNLOAD, claim.run_id)
    assert action.payload == {"uuid": "job", "image_url": "https://x/a.png", "run_id": claim.run_id}
    assert life.sweep() == []  # one republish, not one per sweep


def test_another_message_takes_over_a_claim_unpublished_past_its_lease(life: Lifecycle, clock: Clock):
    first = life.jobs.claim("job", "m1", now=clock.now)
    assert life.jobs.claim("job", "m2", now=clock.now + 1).decision is Decision.DUPLICATE
    later = life.jobs.claim("job", "m3", now=clock.now + PUBLISH_LEASE_SECONDS + 1)
    assert later.decision is Decision.RUN and later.run_id != first.run_id


def test_a_stage_whose_holder_died_is_republished_then_the_run_fails_stalled(life: Lifecycle, clock: Clock):
    run = started(life, clock)
    through(life, "job", run, Stage.DOWNLOAD)
    for _ in range(3):
        hold = life.start_stage("job", run, Stage.SEGMENT, {"uuid": "job", "run_id": run})
        assert isinstance(hold, Hold)  # …and its worker dies (an OOM kill every time)
        clock.now += LEASE + GRACE + 1
        (action,) = life.sweep()
        assert (action.kind, action.stage) == (SweepKind.REPUBLISH, Stage.SEGMENT)
    assert isinstance(life.start_stage("job", run, Stage.SEGMENT, {"uuid": "job", "run_id": run}), Hold)
    clock.now += LEASE + GRACE + 1
    (action,) = life.sweep()
    assert action.kind is SweepKind.FAILED
    record = life.jobs.get("job")
    assert record is not None and record.status is JobState.FAILED and record.error is not None
    assert record.error.code == "stalled"


# --- 6. callbacks over a long outage --------------------------------------------------------------------------
def test_a_callback_is_retried_over_hours_and_delivered_when_the_app_server_returns(life: Lifecycle, clock: Clock):
    run = started(life, clock)
    hold = life.start_stage("job", run, Stage.DOWNLOAD, {"uuid": "job", "run_id": run})
    assert isinstance(hold, Hold) and life.fail("job", run, ERROR, token=hold.token)
    first = clock.now
    attempts = 0
    while clock.now - first < 2 * 3600:  # the app server is down for two hours
        ticket = life.begin_send("job", run)
        if ticket is None:
            box = life.jobs.get("job").callback  # type: ignore[union-attr]
            assert box is not None and box.state is OutboxState.PENDING
            clock.now = max(clock.now + 1, box.next_attempt_at or clock.now)
            continue
        attempts += 1
        box = life.record_attempt(ticket, AttemptResult(False, 503, "HTTP 503"))
        assert box is not None
        if box.state is not OutboxState.PENDING:
            break
    # make_settings: 6 attempts within a 1 h horizon, backoff capped at 60 s — whichever is spent first.
    box = life.jobs.get("job").callback  # type: ignore[union-attr]
    assert box is not None and box.state is OutboxState.EXPIRED and attempts == box.attempts <= 6


def test_a_callback_attempt_after_an_outage_is_delivered_with_the_same_body(life: Lifecycle, clock: Clock):
    run = started(life, clock)
    hold = life.start_stage("job", run, Stage.DOWNLOAD, {"uuid": "job", "run_id": run})
    assert isinstance(hold, Hold) and life.fail("job", run, ERROR, token=hold.token)
    first = life.begin_send("job", run)
    assert first is not None
    box = life.record_attempt(first, AttemptResult(False, 500, "HTTP 500", retry_after="30"))
    assert box is not None and box.state is OutboxState.PENDING and box.next_attempt_at == pytest.approx(clock.now + 30)
    clock.now += 30
    second = life.begin_send("job", run)
    assert second is not None and (second.status, second.error) == (first.status, first.error)
    done = life.record_attempt(second, AttemptResult(True, 200))
    assert done is not None and done.state is OutboxState.DELIVERED and done.attempts == 2


def test_410_stops_the_callback(life: Lifecycle, clock: Clock):
    run = started(life, clock)
    hold = life.start_stage("job", run, Stage.DOWNLOAD, {"uuid": "job", "run_id": run})
    assert isinstance(hold, Hold) and life.fail("job", run, ERROR, token=hold.token)
    ticket = life.begin_send("job", run)
    assert ticket is not None
    box = life.record_attempt(ticket, AttemptResult(False, 410, "HTTP 410"))
    assert box is not None and box.state is OutboxState.GONE
    clock.now += 3600
    assert life.begin_send("job", run) is None


# --- 7. two notifies never both send ---------------------------------------------------------------------------
def test_two_attempts_at_once_get_one_send_marker(life: Lifecycle, clock: Clock):
    run = started(life, clock)
    hold = life.start_stage("job", run, Stage.DOWNLOAD, {"uuid": "job", "run_id": run})
    assert isinstance(hold, Hold) and life.fail("job", run, ERROR, token=hold.token)
    first = life.begin_send("job", run)
    assert first is not None
    assert life.begin_send("job", run) is None  # the second attempt sees the marker: it does not send
    # The first attempt's process dies while sending. Once its marker runs out, the sweeper first opens a
    # reclaim window (a live holder could still record), then, the window over, queues another attempt.
    clock.now = first.marker + GRACE + 1
    assert life.sweep() == []
    box = life.jobs.get("job").callback
    assert box is not None and box.state is OutboxState.SENDING and box.reclaim_at == clock.now + SEND_RECLAIM_SECONDS
    assert life.begin_send("job", run) is None
    clock.now = box.reclaim_at + 1
    (action,) = life.sweep()
    assert action.kind is SweepKind.DELIVER
    again = life.begin_send("job", run)
    assert again is not None and again.marker != first.marker
    assert life.record_attempt(first, AttemptResult(True, 200)) is None  # the stale attempt records nothing


def test_a_holder_that_could_not_record_through_an_outage_records_before_its_marker_is_taken(
    life: Lifecycle, clock: Clock
):
    """The chaos run's duplicate (CI, stop 23): an attempt got 2xx, the job store went down before the answer
    was recorded, and once the store was back another attempt took the run-out marker and PATCHed again. Now a
    stale marker is only reclaimed: the holder, retrying, records within the window and nothing is sent again."""
    run = started(life, clock)
    hold = life.start_stage("job", run, Stage.DOWNLOAD, {"uuid": "job", "run_id": run})
    assert isinstance(hold, Hold) and life.fail("job", run, ERROR, token=hold.token)
    first = life.begin_send("job", run)
    assert first is not None
    clock.now = first.marker + 180  # a three-minute outage: the answer (2xx) waits in the holder's process
    assert life.begin_send("job", run) is None  # the message's redelivery: it opens the window, sends nothing
    reclaim_at = life.jobs.get("job").callback.reclaim_at
    assert reclaim_at == clock.now + SEND_RECLAIM_SECONDS
    assert life.begin_send("job", run) is None and life.sweep() == []  # inside the window: nobody sends
    clock.now += SEND_RECLAIM_SECONDS / 15  # the holder's next try
    box = life.record_attempt(first, AttemptResult(True, 200))
    assert box is not None and box.state is OutboxState.DELIVERED and box.reclaim_at is None
    clock.now = reclaim_at + 1
    assert life.begin_send("job", run) is None and life.sweep() == []
    assert life.jobs.get("job").callback.attempts == 1


def test_a_stage_whose_holders_keep_dying_ends_worker_lost_on_its_own(life: Lifecycle, clock: Clock):
    """A poison stage whose redeliveries are handed back (Busy) never reaches SQS's dead-letter queue: the
    lifecycle counts takeovers from dead holders and ends the run at SAMSEG_TASK_MAX_RECEIVE_COUNT."""
    run = started(life, clock)
    through(life, "job", run, Stage.DOWNLOAD)
    limit = life.settings.task_max_receive_count
    for _ in range(limit):
        hold = life.start_stage("job", run, Stage.SEGMENT, {"uuid": "job", "run_id": run})
        assert isinstance(hold, Hold)  # …and the worker dies with it
        clock.now += LEASE + 1
    ended = life.start_stage("job", run, Stage.SEGMENT, {"uuid": "job", "run_id": run})
    assert isinstance(ended, Ended) and ended.error.code == "worker_lost"
    record = life.jobs.get("job")
    assert record is not None and record.status is JobState.FAILED
    assert record.callback is not None and record.callback.state is OutboxState.PENDING


def test_a_released_lease_is_not_counted_as_a_death(life: Lifecycle, clock: Clock):
    run = started(life, clock)
    for _ in range(life.settings.task_max_receive_count + 1):
        hold = life.start_stage("job", run, Stage.DOWNLOAD, {"uuid": "job", "run_id": run})
        assert isinstance(hold, Hold)
        assert life.release("job", run, hold.token)  # a retry after an outage gives the lease back


# --- issue 16: cancel and deadlines, as lifecycle transitions ------------------------------------------------
def test_a_queued_job_is_canceled_at_once_and_its_stages_then_end_quietly(life: Lifecycle, clock: Clock):
    run = started(life, clock)
    outcome, record = life.cancel("job")
    assert outcome is CancelOutcome.CANCELED and record is not None and record.status is JobState.CANCELED
    assert record.callback is not None and record.callback.state is OutboxState.PENDING  # queued in the same write
    assert isinstance(life.start_stage("job", run, Stage.DOWNLOAD, {"uuid": "job", "run_id": run}), Gone)
    again, _ = life.cancel("job")
    assert again is CancelOutcome.TERMINAL  # DELETE answers 409
    assert life.cancel("nobody")[0] is CancelOutcome.UNKNOWN
    ticket = life.begin_send("job", run)
    assert ticket is not None and ticket.status is JobState.CANCELED


def test_a_cancel_reaching_a_held_stage_is_ended_by_its_holder_at_the_next_boundary(life: Lifecycle, clock: Clock):
    run = started(life, clock)
    through(life, "job", run, Stage.DOWNLOAD)
    hold = life.start_stage("job", run, Stage.SEGMENT, {"uuid": "job", "run_id": run})
    assert isinstance(hold, Hold)
    outcome, record = life.cancel("job")
    assert outcome is CancelOutcome.REQUESTED and record is not None and record.status is JobState.RUNNING
    assert record.cancel_requested and record.to_status().cancel_requested
    assert life.cancel("job")[0] is CancelOutcome.REQUESTED  # idempotent
    assert life.renew("job", run, hold.token)  # the holder keeps its lease until it looks
    assert life.hand_off("job", run, hold.token, {"uuid": "job", "run_id": run}) is Step.CANCELED
    final = life.jobs.get("job")
    assert final is not None and final.status is JobState.CANCELED and not final.cancel_requested
    assert final.callback is not None and final.callback.open


def test_a_holder_that_sees_the_cancel_mid_work_ends_the_run(life: Lifecycle, clock: Clock):
    run = started(life, clock)
    through(life, "job", run, Stage.DOWNLOAD)
    hold = life.start_stage("job", run, Stage.SEGMENT, {"uuid": "job", "run_id": run})
    assert isinstance(hold, Hold)
    life.cancel("job")
    assert life.end_canceled("job", run, "not-the-token") is Step.LOST
    assert life.end_canceled("job", run, hold.token) is Step.CANCELED
    assert life.end_canceled("job", run, hold.token) is Step.LOST  # once


def test_a_cancel_whose_holder_died_is_ended_by_the_takeover_or_the_sweeper(life: Lifecycle, clock: Clock):
    for uuid, by in (("job-t", "takeover"), ("job-s", "sweeper")):
        run = started(life, clock, uuid)
        through(life, uuid, run, Stage.DOWNLOAD)
        assert isinstance(life.start_stage(uuid, run, Stage.SEGMENT, {"uuid": uuid, "run_id": run}), Hold)
        assert life.cancel(uuid)[0] is CancelOutcome.REQUESTED
        clock.now += LEASE + 1  # the holder died without looking
        if by == "takeover":
            outcome = life.start_stage(uuid, run, Stage.SEGMENT, {"uuid": uuid, "run_id": run})
            assert isinstance(outcome, Ended) and outcome.state is JobState.CANCELED and outcome.error is None
        else:
            clock.now += GRACE + 1
            actions = [a for a in life.sweep() if a.uuid == uuid]
            assert [a.kind for a in actions] == [SweepKind.FAILED]  # ended: its callback is queued
        record = life.jobs.get(uuid)
        assert record is not None and record.status is JobState.CANCELED, by


def test_notify_after_a_cancel_ends_canceled_not_completed(life: Lifecycle, clock: Clock):
    run = started(life, clock)
    through(life, "job", run, Stage.DOWNLOAD, Stage.SEGMENT, Stage.PERSIST)
    hold = life.start_stage("job", run, Stage.NOTIFY, {"uuid": "job", "run_id": run})
    assert isinstance(hold, Hold)
    life.cancel("job")
    assert life.complete("job", run, hold.token) is Step.CANCELED
    record = life.jobs.get("job")
    assert record is not None and record.status is JobState.CANCELED


def test_a_job_past_its_deadline_fails_expired_before_the_model_runs(life: Lifecycle, clock: Clock):
    run = started(life, clock)
    payload = {"uuid": "job", "run_id": run, "deadline": clock.now + 30}
    hold = life.start_stage("job", run, Stage.DOWNLOAD, payload)
    assert isinstance(hold, Hold)
    assert life.hand_off("job", run, hold.token, payload)
    clock.now += 31  # the segment message waited in a backlog
    outcome = life.start_stage("job", run, Stage.SEGMENT, payload)
    assert isinstance(outcome, Ended) and outcome.state is JobState.FAILED
    assert outcome.error is not None and outcome.error.code == "expired"
    record = life.jobs.get("job")
    assert record is not None and record.status is JobState.FAILED and record.callback is not None


def test_a_deadline_does_not_stop_a_segmentation_that_already_started(life: Lifecycle, clock: Clock):
    run = started(life, clock)
    payload = {"uuid": "job", "run_id": run, "deadline": clock.now + 30}
    through(life, "job", run, Stage.DOWNLOAD)
    assert isinstance(life.start_stage("job", run, Stage.SEGMENT, payload), Hold)
    clock.now += LEASE + 1  # its worker died after the deadline: the takeover re-runs it (it had started)
    assert isinstance(life.start_stage("job", run, Stage.SEGMENT, payload), Hold)


# --- a stopping worker gives its leases up --------------------------------------------------------------------
def test_leases_released_at_a_soft_shutdown_free_the_run_at_once_and_silence_the_old_holder(
    life: Lifecycle, clock: Clock, monkeypatch: pytest.MonkeyPatch
):
    """samseg.ops.soft_shutdown's deadline: the process is about to end with a stage still running. Its lease,
    released, lets the redelivered copy take the run at once (not Busy for SAMSEG_STAGE_LEASE_SECONDS), and the
    stage still running here for a moment can no longer hand off."""
    from samseg.worker.leases import HeldLease, LeaseKeeper, release_held_leases

    monkeypatch.setattr(LeaseKeeper, "_instance", None)  # this test's keeper, forgotten after it
    assert release_held_leases() == 0  # no stage has run in this process
    run = started(life, clock)
    payload = {"uuid": "job", "run_id": run}
    hold = life.start_stage("job", run, Stage.DOWNLOAD, payload)
    assert isinstance(hold, Hold)
    keeper = LeaseKeeper.for_process(life)
    assert LeaseKeeper.current() is keeper
    keeper.hold("task-1", HeldLease("job", run, hold.token))
    keeper.hold("task-2", HeldLease("gone", "no-run", "no-token"))  # a run the store no longer has: not counted

    assert release_held_leases() == 1
    assert keeper.get("task-1") is None and keeper.release_all() == 0  # nothing left to release, or to renew

    taken = life.start_stage("job", run, Stage.DOWNLOAD, payload)
    assert isinstance(taken, Hold) and taken.token != hold.token
    assert life.hand_off("job", run, hold.token, payload) is Step.LOST
    assert life.hand_off("job", run, taken.token, payload) is Step.DONE
