"""A Hypothesis state machine over samseg's job lifecycle (samseg.stores.lifecycle) on a real job store.

It plays every party at once — the ingress claiming deliveries of a job (duplicates included), copies of each
stage delivered more than once, late or concurrently (a stage may stop between any two of its writes: a crash
is a holder that simply never writes again), the store failing transiently, the clock moving, the sweeper
running and the app server answering callback attempts with 2xx, 5xx, 410 or a timeout — and checks after every
step what samseg promises:

- at most one terminal state per run, and a terminal run never changes state again;
- at most one callback body per `webhook-id` (uuid.run_id);
- a callback the app server accepted is not sent again while its attempt's holder lives — even when the store
  went down before the answer was recorded: the holder retries it every RECORD_RETRY_SECONDS of clock while
  the store is up, and a stale marker is reclaimed, not taken at once. (Excused: an outage that covered the
  whole reclaim window, the documented residual, and the app server's own re-send of a completed job.);
- no run ends `failed` after its result was published (persist handed it on);
- a cancel that reached a live run (ended it, or was recorded for its holder) ends that run `canceled`;
- the model never starts for a run past its deadline (a segment is first held only before it);
- a re-sent uuid with another body while its run is active changes nothing (a conflict); the same body after
  `completed` reopens the same run's outbox (the same webhook-id, the same body), never a new run;
- once faults stop, the clock moves and the sweeper and workers keep going, every run ends and every callback
  outbox closes (checked in `teardown`).

Only AWS itself is stood in for (the DynamoDB variant runs on a moto server); the store and the lifecycle are the
real ones. The clock is the lifecycle's own injectable clock.
"""

from __future__ import annotations

import errno
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from samseg.core.contracts import ErrorInfo, JobState, OutboxState, Stage
from samseg.core.settings import Settings
from samseg.stores.jobs import Decision, JobBackend, JobStore
from samseg.stores.lifecycle import (
    SEND_RECLAIM_SECONDS,
    STAGE_ORDER,
    AttemptResult,
    Busy,
    CancelOutcome,
    Ended,
    Forward,
    Gone,
    Hold,
    Lifecycle,
    SendTicket,
    SweepKind,
)

UUIDS = ("job-a", "job-b")
LEASE, GRACE, STALE = 30.0, 10.0, 600.0
RECORD_RETRY_SECONDS = SEND_RECLAIM_SECONDS / 15  # samseg.worker.outbox's (it imports Celery; this module doesn't)


class Clock:
    """The lifecycle's injectable clock, for scenario tests that move time by hand."""

    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


class StoreDown(ConnectionRefusedError):
    """What an unreachable store raises (a refused connection: samseg.core.errors.is_transient says transient)."""

    def __init__(self) -> None:
        super().__init__(errno.ECONNREFUSED, "job store unreachable (injected)")


class FlakyBackend:
    """The real backend, refusing every call while `down` (a store outage seen from samseg)."""

    def __init__(self, inner: JobBackend) -> None:
        self.inner = inner
        self.down = False

    def __getattr__(self, name: str) -> Any:
        attribute = getattr(self.inner, name)
        if not callable(attribute):
            return attribute

        def call(*args: Any, **kwargs: Any) -> Any:
            if self.down:
                raise StoreDown()
            return attribute(*args, **kwargs)

        return call


@dataclass
class Copy:
    """A stage message being worked on: which run and stage, and the lease it holds (if any)."""

    uuid: str
    run_id: str
    stage: Stage
    payload: dict[str, Any]
    token: str | None = None


@dataclass
class World:
    now: float = 1_000_000.0
    messages: list[Copy] = field(default_factory=list)  # stage messages on the queues
    holders: list[Copy] = field(default_factory=list)  # copies that hold a lease right now
    tickets: list[SendTicket] = field(default_factory=list)  # callback attempts in flight
    terminal: dict[tuple[str, str], JobState] = field(default_factory=dict)
    bodies: dict[str, set[tuple[str, str | None]]] = field(default_factory=dict)  # webhook-id → bodies sent
    published: set[tuple[str, str]] = field(default_factory=set)  # runs whose persist handed off
    canceled: set[tuple[str, str]] = field(default_factory=set)  # runs a cancel reached while they were live
    segmented: set[tuple[str, str]] = field(default_factory=set)  # runs whose segment stage was held once
    # Answers a live holder could not record (the store was down), retried as samseg.worker.outbox does.
    unrecorded: list[tuple[SendTicket, AttemptResult]] = field(default_factory=list)
    up_since_retry: float = 0.0  # clock seconds with the store up since the holders last retried
    delivered_live: dict[str, float] = field(default_factory=dict)  # webhook-id → marker of a live holder's 2xx
    # (webhook-id, marker) → whether an outage happened while that stale marker's reclaim window was open
    reclaims: dict[tuple[str, float], bool] = field(default_factory=dict)


def make_settings() -> Settings:
    return Settings(
        stage_lease_seconds=LEASE,
        sweep_grace_seconds=GRACE,
        stale_run_seconds=STALE,
        sweep_max_republish=3,
        app_server_url="http://127.0.0.1:9",
        callback_max_attempts=6,
        callback_backoff_seconds=1.0,
        callback_backoff_max_seconds=60.0,
        callback_horizon_seconds=3600.0,
    )


class LifecycleMachine(RuleBasedStateMachine):
    """Subclasses set `make_backend` (a fresh, empty backend per example)."""

    make_backend: Callable[[], JobBackend]

    def __init__(self) -> None:
        super().__init__()
        self.world = World()
        self.flaky = FlakyBackend(self.make_backend())
        self.store = JobStore(self.flaky, STALE, GRACE)  # type: ignore[arg-type]
        self.settings = make_settings()
        self.lifecycle = Lifecycle(self.store, self.settings, clock=lambda: self.world.now)
        self.message_ids = 0

    # --- helpers --------------------------------------------------------------------------------------------
    def _try(self, action: Callable[[], Any]) -> Any:
        """Run one party's step; an outage aborts the step (the party retries later, as samseg's do)."""
        try:
            return action()
        except StoreDown:
            return None

    def _observe(self) -> None:
        self.flaky.down, was_down = False, self.flaky.down
        try:
            for uuid in UUIDS:
                record = self.store.get(uuid)
                if record is None or record.run_id is None:
                    continue
                key = (uuid, record.run_id)
                if record.terminal:
                    seen = self.world.terminal.setdefault(key, record.status)
                    assert seen is record.status, f"run {key} ended {seen.value} and then {record.status.value}"
                else:
                    assert key not in self.world.terminal, f"run {key} left its terminal state {record}"
                if record.status is JobState.FAILED:
                    assert key not in self.world.published, f"run {key} failed after its result was published"
        finally:
            self.flaky.down = was_down

    # --- the parties ----------------------------------------------------------------------------------------
    @initialize()
    def start(self) -> None:
        self.world = World()

    @rule(
        uuid=st.sampled_from(UUIDS),
        same_message=st.booleans(),
        body=st.sampled_from(["A", "A", "B"]),
        ttl=st.sampled_from([None, None, 5.0, LEASE * 3]),
    )
    def ingress_delivers(self, uuid: str, same_message: bool, body: str, ttl: float | None) -> None:
        """A job message arrives (the same SQS message again, or a resend — maybe with another body: the
        fingerprint) and the ingress claims it; `ttl`: its deadline, from now."""
        if not same_message:
            self.message_ids += 1
        message_id = f"m-{uuid}-{self.message_ids}"
        now = self.world.now
        first: dict[str, Any] = {"uuid": uuid} if ttl is None else {"uuid": uuid, "deadline": now + ttl}
        before = self._try(lambda: self.store.get(uuid))
        claim = self._try(
            lambda: self.store.claim(uuid, message_id, now=now, payload=first, fingerprint=f"{uuid}-{body}")
        )
        if claim is None:
            return
        if claim.decision is Decision.CONFLICT:
            after = self._try(lambda: self.store.get(uuid))
            assert before is not None and not before.terminal, f"a conflict with no active run: {before}"
            assert after is None or after.version == before.version, "a conflicting re-send changed the record"
        if claim.decision is Decision.REDELIVER:
            assert before is not None and before.status is JobState.COMPLETED
            assert claim.record.run_id == before.run_id and claim.record.status is JobState.COMPLETED
            self.world.delivered_live.pop(f"{uuid}.{claim.record.run_id}", None)  # it asked for it again
        if claim.decision is not Decision.RUN:
            return
        payload = {**first, "run_id": claim.run_id}
        self.world.messages.append(Copy(uuid, claim.run_id, Stage.DOWNLOAD, payload))
        self._try(lambda: self.store.mark_published(uuid, claim.run_id, now=now))

    @precondition(lambda self: self.world.messages)
    @rule(data=st.data(), duplicate=st.booleans())
    def a_stage_copy_starts(self, data: st.DataObject, duplicate: bool) -> None:
        """A worker receives a stage message (SQS may also deliver it again: `duplicate`)."""
        index = data.draw(st.integers(0, len(self.world.messages) - 1))
        message = self.world.messages[index] if duplicate else self.world.messages.pop(index)
        outcome = self._try(
            lambda: self.lifecycle.start_stage(message.uuid, message.run_id, message.stage, message.payload)
        )
        if outcome is None:
            self.world.messages.append(message)  # the outage: the message comes back
        elif isinstance(outcome, Hold):
            key = (message.uuid, message.run_id)
            deadline = message.payload.get("deadline")
            if message.stage is Stage.SEGMENT and key not in self.world.segmented:
                assert deadline is None or self.world.now <= deadline, f"{key}: segmentation started past its deadline"
                self.world.segmented.add(key)
            self.world.holders.append(Copy(message.uuid, message.run_id, message.stage, message.payload, outcome.token))
        elif isinstance(outcome, Busy):
            self.world.messages.append(message)  # handed back, looks again later
        elif isinstance(outcome, Forward):
            self.world.messages.append(Copy(message.uuid, message.run_id, outcome.stage, outcome.payload))
        else:
            assert isinstance(outcome, Gone | Ended)

    @precondition(lambda self: self.world.messages)
    @rule(data=st.data(), then=st.sampled_from(["finish", "finish", "fail"]))
    def a_worker_takes_a_message_through(self, data: st.DataObject, then: str) -> None:
        """The common case, in one step: a copy starts and, holding the run, finishes (or fails) its stage."""
        before = len(self.world.holders)
        self.a_stage_copy_starts(data, duplicate=False)
        if len(self.world.holders) > before:
            if then == "crash":
                self.world.holders.pop()
            else:
                self._act(self.world.holders[-1], then)

    @precondition(lambda self: self.world.messages)
    @rule(data=st.data(), stages=st.integers(1, 4), then=st.sampled_from(["finish", "fail", "crash"]))
    def workers_make_progress(self, data: st.DataObject, stages: int, then: str) -> None:
        """Several stages in a row go well, then the last one finishes, fails or dies mid-way."""
        for left in range(stages, 0, -1):
            if not self.world.messages:
                return
            self.a_worker_takes_a_message_through(data, "finish" if left > 1 else then)

    @precondition(lambda self: self.world.holders)
    @rule(data=st.data(), action=st.sampled_from(["finish", "fail", "renew", "crash", "see_cancel"]))
    def a_holder_acts(self, data: st.DataObject, action: str) -> None:
        self._act(self.world.holders[data.draw(st.integers(0, len(self.world.holders) - 1))], action)

    def _act(self, holder: Copy, action: str) -> None:
        assert holder.token is not None
        if action == "crash":  # the process died: this copy never writes again
            self.world.holders.remove(holder)
            return
        if action == "renew":
            self._try(lambda: self.lifecycle.renew(holder.uuid, holder.run_id, holder.token or ""))
            return
        if action == "see_cancel":  # the segmenter's check between decoder batches
            record = self._try(lambda: self.store.get(holder.uuid))
            if record is not None and record.run_id == holder.run_id and record.cancel_requested:
                self.world.holders.remove(holder)
                self._try(lambda: self.lifecycle.end_canceled(holder.uuid, holder.run_id, holder.token or ""))
            return
        self.world.holders.remove(holder)
        if action == "fail":
            error = ErrorInfo(code="model_error", message="injected")
            ended = self._try(lambda: self.lifecycle.fail(holder.uuid, holder.run_id, error, token=holder.token))
            if ended is None:
                self.world.messages.append(Copy(holder.uuid, holder.run_id, holder.stage, holder.payload))
            return
        if holder.stage is Stage.NOTIFY:
            done = self._try(lambda: self.lifecycle.complete(holder.uuid, holder.run_id, holder.token or ""))
            if done is None:
                self.world.messages.append(Copy(holder.uuid, holder.run_id, holder.stage, holder.payload))
            return
        nxt = STAGE_ORDER[STAGE_ORDER.index(holder.stage) + 1]
        handed = self._try(
            lambda: self.lifecycle.hand_off(holder.uuid, holder.run_id, holder.token or "", holder.payload)
        )
        if handed:
            if holder.stage is Stage.PERSIST:
                self.world.published.add((holder.uuid, holder.run_id))
            self.world.messages.append(Copy(holder.uuid, holder.run_id, nxt, holder.payload))
        elif handed is None:  # an outage at the last write: the stage is retried
            self.world.messages.append(Copy(holder.uuid, holder.run_id, holder.stage, holder.payload))

    @rule(uuid=st.sampled_from(UUIDS), stage=st.sampled_from(STAGE_ORDER))
    def the_reaper_fails_a_dead_stage(self, uuid: str, stage: Stage) -> None:
        """A stage message dead-lettered after killing its worker every time: fail it if its holder is gone."""
        record = self._try(lambda: self.store.get(uuid))
        if record is None or record.run_id is None:
            return
        error = ErrorInfo(code="worker_lost", message="injected")
        run_id = record.run_id
        self._try(lambda: self.lifecycle.fail(uuid, run_id, error, stage=stage, lease_expired=True))

    @rule(uuid=st.sampled_from(UUIDS))
    def the_app_server_cancels(self, uuid: str) -> None:
        """DELETE /jobs/{uuid} or a cancel message: the run ends `canceled` now or at its holder's next boundary."""
        result = self._try(lambda: self.lifecycle.cancel(uuid))
        if result is None:
            return
        outcome, record = result
        if outcome in (CancelOutcome.CANCELED, CancelOutcome.REQUESTED):
            assert record is not None and record.run_id is not None
            self.world.canceled.add((uuid, record.run_id))
        if outcome is CancelOutcome.CANCELED:
            assert record is not None and record.status is JobState.CANCELED

    @rule(seconds=st.sampled_from([1.0, 5.0, LEASE, LEASE + GRACE + 1, STALE + GRACE + 1]))
    def time_passes(self, seconds: float) -> None:
        if not self.flaky.down:
            self.world.up_since_retry += seconds
            if self.world.up_since_retry >= RECORD_RETRY_SECONDS:  # the holders retried within this time
                self._holders_record()
                self.world.up_since_retry = 0.0
        self.world.now += seconds

    @rule(down=st.sampled_from([True, False, False, False]))
    def the_store_goes(self, down: bool) -> None:
        """The store goes down (for a while: most steps bring it back)."""
        self.flaky.down = down
        if down:
            self.world.up_since_retry = 0.0
            for key in self.world.reclaims:  # an outage inside a reclaim window (closed ones: no matter)
                self.world.reclaims[key] = True

    @rule()
    def the_sweeper_runs(self) -> None:
        actions = self._try(self.lifecycle.sweep)
        self._note_reclaims()
        for action in actions or []:
            if action.kind is SweepKind.REPUBLISH and action.stage is not None and action.payload is not None:
                self.world.messages.append(Copy(action.uuid, action.run_id, action.stage, action.payload))
            # DELIVER / FAILED: a callback attempt is queued — `a_callback_attempt_starts` plays it

    @rule(uuid=st.sampled_from(UUIDS))
    def a_callback_attempt_starts(self, uuid: str) -> None:
        record = self._try(lambda: self.store.get(uuid))
        if record is None or record.run_id is None:
            return
        run_id = record.run_id
        ticket = self._try(lambda: self.lifecycle.begin_send(uuid, run_id))
        self._sent(ticket)
        if ticket is not None:
            self.world.tickets.append(ticket)

    @precondition(lambda self: self.world.tickets)
    @rule(data=st.data(), answer=st.sampled_from([200, 500, 410, None, "crash", "200, then an outage"]))
    def the_app_server_answers(self, data: st.DataObject, answer: int | str | None) -> None:
        ticket = self.world.tickets.pop(data.draw(st.integers(0, len(self.world.tickets) - 1)))
        if answer == "crash":
            return  # the attempt's process died before (or after) sending: its marker runs out
        outage = answer == "200, then an outage"
        if outage:  # the chaos run's case: the store goes down between the 2xx and its record, past the marker
            answer = 200
            self.the_store_goes(True)
        body = (ticket.status.value, ticket.error.code if ticket.error else None)
        self.world.bodies.setdefault(f"{ticket.uuid}.{ticket.run_id}", set()).add(body)
        status = answer if isinstance(answer, int) else None
        result = AttemptResult(delivered=status == 200, http_status=status, error=None if status == 200 else "injected")
        if status == 200:
            self.world.delivered_live[f"{ticket.uuid}.{ticket.run_id}"] = ticket.marker
        try:
            self.lifecycle.record_attempt(ticket, result)
        except StoreDown:
            self.world.unrecorded.append((ticket, result))  # the holder keeps it and retries
        if outage:
            self.time_passes(ticket.marker - self.world.now + 1)  # still down: nobody records
            self.the_store_goes(False)

    @precondition(lambda self: self.world.unrecorded)
    @rule(data=st.data())
    def a_holder_with_an_unrecorded_answer_dies(self, data: st.DataObject) -> None:
        """Its answer dies with it: the marker runs out and the callback may be sent again (documented)."""
        ticket, _ = self.world.unrecorded.pop(data.draw(st.integers(0, len(self.world.unrecorded) - 1)))
        self.world.delivered_live.pop(f"{ticket.uuid}.{ticket.run_id}", None)

    def _holders_record(self) -> None:
        """The holders' retry round (samseg.worker.outbox.UnrecordedAttempts.record_all)."""
        for item in list(self.world.unrecorded):
            ticket, result = item
            try:
                self.lifecycle.record_attempt(ticket, result)
            except StoreDown:
                continue
            self.world.unrecorded.remove(item)  # recorded, or its marker was taken over (checked at that send)

    def _sent(self, ticket: SendTicket | None) -> None:
        """After a begin_send: a send of a callback a live holder had delivered must be excused; note newly
        opened reclaim windows."""
        if ticket is not None:
            webhook_id = f"{ticket.uuid}.{ticket.run_id}"
            marker = self.world.delivered_live.pop(webhook_id, None)
            if marker is not None:
                assert self.world.reclaims.get((webhook_id, marker)), (
                    f"{webhook_id}: sent again a callback its live holder had delivered, with no outage over the "
                    "whole reclaim window"
                )
        self._note_reclaims()

    def _note_reclaims(self) -> None:
        self.flaky.down, was_down = False, self.flaky.down
        try:
            for uuid in UUIDS:
                record = self.store.get(uuid)
                box = record.callback if record is not None else None
                if record is None or box is None or box.reclaim_at is None or box.sending_until is None:
                    continue
                self.world.reclaims.setdefault((f"{uuid}.{record.run_id}", box.sending_until), False)
        finally:
            self.flaky.down = was_down

    # --- what must always hold ------------------------------------------------------------------------------
    @invariant()
    def one_outcome_per_run(self) -> None:
        self._observe()

    @invariant()
    def one_body_per_webhook_id(self) -> None:
        for webhook_id, bodies in self.world.bodies.items():
            assert len(bodies) <= 1, f"{webhook_id} sent different bodies: {bodies}"

    # --- and once faults stop ---------------------------------------------------------------------------------
    def teardown(self) -> None:
        """Faults stop; workers, the sweeper and the app server keep going: every run must end, every outbox
        close, within a bounded number of rounds."""
        self.flaky.down = False
        self.world.holders.clear()  # whatever was in flight died with the faults
        self.world.tickets.clear()
        self.world.unrecorded.clear()
        self.world.delivered_live.clear()
        for _ in range(200):
            self.world.now += LEASE + GRACE + 1
            for action in self.lifecycle.sweep():
                if action.kind is SweepKind.REPUBLISH and action.stage is not None and action.payload is not None:
                    self.world.messages.append(Copy(action.uuid, action.run_id, action.stage, action.payload))
            self._drain()
            if self._settled():
                break
        self._observe()
        for uuid in UUIDS:
            record = self.store.get(uuid)
            if record is None or record.run_id is None:
                continue
            assert record.terminal, f"{uuid} never ended: {record}"
            assert record.callback is not None and not record.callback.open, f"{uuid}'s callback never closed"
            if (uuid, record.run_id) in self.world.canceled:
                assert record.status is JobState.CANCELED, f"{uuid}: a cancel reached the run, it ended {record}"

    def _drain(self) -> None:
        for _ in range(50):
            if not self.world.messages:
                break
            message = self.world.messages.pop(0)
            outcome = self.lifecycle.start_stage(message.uuid, message.run_id, message.stage, message.payload)
            if isinstance(outcome, Busy):
                self.world.messages.append(message)
                continue
            if isinstance(outcome, Forward):
                self.world.messages.append(Copy(message.uuid, message.run_id, outcome.stage, outcome.payload))
                continue
            if not isinstance(outcome, Hold):
                continue
            if message.stage is Stage.NOTIFY:
                self.lifecycle.complete(message.uuid, message.run_id, outcome.token)
                continue
            if self.lifecycle.hand_off(message.uuid, message.run_id, outcome.token, message.payload):
                if message.stage is Stage.PERSIST:
                    self.world.published.add((message.uuid, message.run_id))
                nxt = STAGE_ORDER[STAGE_ORDER.index(message.stage) + 1]
                self.world.messages.append(Copy(message.uuid, message.run_id, nxt, message.payload))
        for uuid in UUIDS:
            record = self.store.get(uuid)
            if record is None or record.run_id is None:
                continue
            ticket = self.lifecycle.begin_send(uuid, record.run_id)
            if ticket is not None:
                body = (ticket.status.value, ticket.error.code if ticket.error else None)
                self.world.bodies.setdefault(f"{uuid}.{ticket.run_id}", set()).add(body)
                self.lifecycle.record_attempt(ticket, AttemptResult(delivered=True, http_status=200))
        self.one_body_per_webhook_id()

    def _settled(self) -> bool:
        for uuid in UUIDS:
            record = self.store.get(uuid)
            if record is None or record.run_id is None:
                continue
            if (
                not record.terminal
                or record.callback is None
                or record.callback.state
                in (
                    OutboxState.PENDING,
                    OutboxState.SENDING,
                )
            ):
                return False
        return True
