"""A job's lifecycle: its states, its stages and every transition between them — in one place.

```
          claim (ingress)          start_stage(download)      hand_off / start_stage(next) …
  (none) ───────────────▶ queued ─────────────────────────▶ running:download ─▶ … ─▶ running:notify
                            │  sweeper: unpublished past       │ lease lost / expired: another copy
                            │  the publish lease → republish   │ takes over; sweeper republishes
                            ▼                                  ▼
                 failed | canceled ◀─── fail(token) / cancel / expired ───  complete(token) ──▶ completed
                            │                                                                          │
                            └──────────── outbox: pending ─▶ sending ─▶ delivered | gone | rejected | expired
```

Every transition is one compare-and-swap on the record's `version` (`JobBackend.swap`: a conditional write in
SQLite or DynamoDB), decided by a pure function of the record it replaces; a lost race is simply decided again
on the newer record. The rules that make every run end in exactly one outcome *by construction*:

- **A stage holds its run by a lease** (`start_stage` → `Hold(token)`), renewed while it works
  (`renew`, every third of SAMSEG_STAGE_LEASE_SECONDS). A second copy of the same stage (SQS delivered the
  message twice, or a retry outlived its visibility) finds the lease live and is told `Busy`: it hands its
  message back and looks again after the lease. It takes over only when the lease ran out — its holder died.
  A stage of a run that moved on, or of a replaced run, is told `Gone` and ends quietly.
- **Only the holder moves the run on**: `hand_off` (to the next stage), `complete` and `fail(token=…)` are
  conditional on the token. A copy that lost its lease never fails the run, never deletes published files,
  never sends a callback. Failing without a token (the dead-letter reaper) is conditional on the stage and
  on its lease having run out.
- **Ending a run and queueing its callback are one write**: `complete`/`fail` set the terminal state *and*
  open the callback outbox (`pending`). The callback is delivered by attempts that each first take the send
  marker (`begin_send`: pending → sending, one CAS, so two senders never both send) and record their outcome
  (`record_attempt`: delivered, gone (410), rejected (other 4xx), or pending again after a backoff until
  SAMSEG_CALLBACK_HORIZON_SECONDS or SAMSEG_CALLBACK_MAX_ATTEMPTS is spent → expired).
- **A send marker that ran out is taken over in two steps**: the first attempt (or sweep) that finds it stale
  only writes `reclaim_at` (SEND_RECLAIM_SECONDS on); the marker is taken — and the callback sent again — only
  at or after that. The marker's holder may be alive and already answered 2xx, unable to record it while the
  job store was unreachable; it keeps trying (samseg.worker.outbox) and, the store reachable again, records
  within the window, so a store outage alone never sends a delivered callback twice. Only a holder that died
  (or that the store stayed unreachable to for the whole window) leaves the app server an identical callback
  (same `webhook-id`) again.
- **A cancel is one write too** (`cancel`): a run no stage holds ends `canceled` at once (outbox opened in the
  same write); a held run is marked `cancel_requested` and only its holder ends it — at `hand_off`,
  `complete`, `fail`, or mid-work (`end_canceled`, when the segmenter sees the mark between decoder batches)
  — or, if the holder died, the copy that takes over or the sweeper. So a progress event the holder sends
  never follows the terminal callback.
- **A deadline is checked where the model would start**: `start_stage` of download or segment past the
  payload's `deadline` ends the run `failed` `expired` in that write (a takeover of a started segment is not).
- **Nothing waits on a lost message**: each write sets `sweep_due`, when the sweeper should look again if
  nothing else happens (a sparse index of active runs, so a sweep costs in proportion to active runs).
  `sweep` turns overdue records into actions: republish a stage or a chain whose message is gone, queue a
  callback attempt whose message is gone, or — after SAMSEG_SWEEP_MAX_REPUBLISH republishes of one stage —
  fail the run `stalled`.

This module decides; the worker (samseg.worker) publishes. It imports no Celery and no HTTP client.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from enum import StrEnum
from typing import Any

import structlog

from samseg.core.backoff import backoff_delay
from samseg.core.contracts import CallbackStatus, ErrorInfo, JobState, OutboxState, Stage
from samseg.core.settings import Settings
from samseg.stores.jobs import CLAIM_ATTEMPTS, PUBLISH_LEASE_SECONDS, JobRecord, JobStore, StoreConflict, rank

log = structlog.get_logger(__name__)

STAGE_ORDER = (Stage.DOWNLOAD, Stage.SEGMENT, Stage.PERSIST, Stage.NOTIFY)
# A job's deadline (`ttl_seconds`) is checked when these stages start: past it, the model never runs.
BEFORE_MODEL = frozenset({Stage.DOWNLOAD, Stage.SEGMENT})
RETRYABLE_STATUS = frozenset({408, 425, 429, 500, 502, 503, 504})
# How long a stale send marker's holder is given to record its outcome once another attempt (or the sweeper)
# has seen the marker stale with the store reachable: several times the interval at which a live holder retries
# an unrecorded outcome (samseg.worker.outbox.RECORD_RETRY_SECONDS).
SEND_RECLAIM_SECONDS = 30.0


def published(r: JobRecord) -> bool:
    """Persist handed the run on: its result is published, so the run can only complete."""
    return r.status is JobState.RUNNING and (r.stage is Stage.NOTIFY or (r.stage is Stage.PERSIST and r.handed_off))


# --- what a stage is told when it starts ----------------------------------------------------------------------
@dataclass(frozen=True)
class Hold:
    """This copy holds the run for `stage` until `until` (renew before then)."""

    token: str
    until: float


@dataclass(frozen=True)
class Busy:
    """Another copy of this stage holds a live lease: hand the message back, look again in `retry_in` seconds."""

    retry_in: float


@dataclass(frozen=True)
class Gone:
    """This stage has nothing to do for this run (replaced, moved on, ended): end quietly."""

    reason: str


@dataclass(frozen=True)
class Ended:
    """The run was ended in this very write instead of being held; queue its callback. Why:

    - `failed` `worker_lost`: the stage's holders died on every one of SAMSEG_TASK_MAX_RECEIVE_COUNT takeovers
      (a poison stage: the OOM killer on one huge image);
    - `failed` `expired`: the job's deadline (`ttl_seconds`) passed before its segmentation started;
    - `canceled`: a cancel was requested while the previous holder worked (it died, or handed off).
    """

    state: JobState
    error: ErrorInfo | None = None


class Step(StrEnum):
    """What a holder's `hand_off` / `complete` / `fail` did. Truthy only for DONE, so `if lifecycle.hand_off(…)`
    reads as before; CANCELED means the run was ended `canceled` in that write (a cancel was pending): queue
    its callback and publish nothing after it."""

    DONE = "done"
    LOST = "lost"  # the lease was lost (another copy holds the run, or it ended): do nothing more
    CANCELED = "canceled"

    def __bool__(self) -> bool:
        return self is Step.DONE


class CancelOutcome(StrEnum):
    """What `Lifecycle.cancel` did."""

    CANCELED = "canceled"  # the run was ended `canceled` in this write: queue its callback
    REQUESTED = "requested"  # a stage holds the run: its holder ends it at its next boundary (within seconds)
    TERMINAL = "terminal"  # the job had already ended: nothing changed
    UNKNOWN = "unknown"  # no record for this uuid


@dataclass(frozen=True)
class Forward:
    """This stage already finished and handed the run on, but the next stage has not started: its message may
    have been lost (the holder died, or SQS was down, between the hand-off and the publish — which is why this
    copy came back unacknowledged). Publish the next stage with `payload`; a duplicate is stopped by its lease."""

    stage: Stage
    payload: dict[str, Any]


StageStart = Hold | Busy | Gone | Forward | Ended


# --- callback attempts ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SendTicket:
    """The send marker of one callback attempt; its body is fixed by the record (`status`, `error`)."""

    uuid: str
    run_id: str
    status: JobState
    error: ErrorInfo | None
    attempt: int
    marker: float  # `sending_until` of this attempt: only the marker's holder records its outcome


@dataclass(frozen=True)
class AttemptResult:
    delivered: bool
    http_status: int | None = None
    error: str | None = None
    retry_after: str | None = None
    give_up: bool = False  # nothing to send (the body is gone): stop as rejected


# --- the sweeper's actions ------------------------------------------------------------------------------------
class SweepKind(StrEnum):
    REPUBLISH = "republish"  # publish the chain from `stage` with `payload`
    DELIVER = "deliver"  # publish a callback attempt
    FAILED = "failed"  # the run was ended (`stalled`, completed if published, or a pending cancel): queue its callback


@dataclass(frozen=True)
class SweepAction:
    kind: SweepKind
    uuid: str
    run_id: str
    stage: Stage | None = None
    payload: dict[str, Any] | None = None


class Lifecycle:
    """Every transition of a job, as conditional writes in the job store (see the module docstring)."""

    def __init__(self, jobs: JobStore, settings: Settings, clock: Callable[[], float] = time.time) -> None:
        self.jobs = jobs
        self.settings = settings
        self.clock = clock
        self.lease = settings.stage_lease_seconds
        self.grace = settings.sweep_grace_seconds

    # --- the CAS loop ------------------------------------------------------------------------------------------
    def _transition(
        self, uuid: str, decide: Callable[[JobRecord, float], tuple[Any, JobRecord | None]]
    ) -> tuple[Any, JobRecord | None]:
        """Read, decide, swap on the version; decide again on a lost race. (outcome, written record or None)."""
        for _ in range(CLAIM_ATTEMPTS):
            current = self.jobs.get(uuid)
            if current is None:
                return None, None
            now = self.clock()
            outcome, successor = decide(current, now)
            if successor is None:
                return outcome, None
            successor = replace(successor, updated_at=now, version=current.version + 1)
            if self.jobs.backend.swap(current.version, successor):
                return outcome, successor
        raise StoreConflict(f"job {uuid}: the record kept changing")

    # --- stages ----------------------------------------------------------------------------------------------
    def start_stage(self, uuid: str, run_id: str, stage: Stage, payload: dict[str, Any]) -> StageStart:
        """A copy of `stage` of run `run_id` begins: Hold (go on), Busy (hand back) or Gone (end quietly)."""

        def decide(r: JobRecord, now: float) -> tuple[StageStart, JobRecord | None]:
            if r.run_id != run_id:
                return Gone(f"run replaced by {r.run_id}"), None
            if r.terminal:
                return Gone(f"run already {r.status.value}"), None
            new_rank, here = rank(JobState.RUNNING, stage), r.rank
            if new_rank < here:
                return Gone(f"run already at {r.stage.value if r.stage else r.status.value}"), None
            if new_rank == here:
                if r.handed_off and not r.cancel_requested:
                    nxt = STAGE_ORDER.index(stage) + 1
                    if nxt < len(STAGE_ORDER) and r.payload is not None:
                        return Forward(STAGE_ORDER[nxt], r.payload), None
                    return Gone(f"{stage.value} already finished"), None
                if r.lease_token is not None and r.lease_until > now:
                    return Busy(retry_in=r.lease_until - now), None
            if r.cancel_requested:  # its holder stopped (died, or handed off) without seeing the cancel
                return Ended(JobState.CANCELED), self._ended(r, JobState.CANCELED, None, now)
            deadline = payload.get("deadline")
            if stage in BEFORE_MODEL and new_rank > here and isinstance(deadline, int | float) and now > deadline:
                error = ErrorInfo(
                    code="expired",
                    message=f"the job's deadline passed {now - deadline:.0f} s before its segmentation could start",
                )
                return Ended(JobState.FAILED, error), self._ended(r, JobState.FAILED, error, now)
            takeovers = r.takeovers + 1 if new_rank == here and r.lease_token is not None else 0
            if takeovers >= self.settings.task_max_receive_count:
                error = ErrorInfo(
                    code="worker_lost",
                    message=f"{stage.value} killed its worker on each of {takeovers} tries (out of memory?)",
                )
                return Ended(JobState.FAILED, error), self._ended(r, JobState.FAILED, error, now)
            token = secrets.token_hex(8)
            until = now + self.lease
            same_stage = new_rank == here
            return Hold(token, until), replace(
                r,
                status=JobState.RUNNING,
                stage=stage,
                lease_token=token,
                lease_until=until,
                payload=payload,
                handed_off=False,
                republished=r.republished if same_stage else 0,
                takeovers=takeovers,
                sweep_due=until + self.grace,
            )

        outcome, _ = self._transition(uuid, decide)
        if outcome is None:
            return Gone("no record for this job")
        if isinstance(outcome, Hold):
            log.info("lifecycle_stage_held", job_uuid=uuid, run_id=run_id, stage=stage.value, lease=outcome.token)
        else:
            log.info("lifecycle_stage_refused", job_uuid=uuid, run_id=run_id, stage=stage.value, outcome=repr(outcome))
        assert isinstance(outcome, Hold | Busy | Gone | Forward | Ended)
        return outcome

    def renew(self, uuid: str, run_id: str, token: str) -> bool:
        """Extend the holder's lease; False once it lost it (then its writes are refused too)."""

        def decide(r: JobRecord, now: float) -> tuple[bool, JobRecord | None]:
            if r.run_id != run_id or r.lease_token != token or r.terminal:
                return False, None
            until = now + self.lease
            return True, replace(r, lease_until=until, sweep_due=until + self.grace)

        held, _ = self._transition(uuid, decide)
        return bool(held)

    def release(self, uuid: str, run_id: str, token: str) -> bool:
        """The holder gives its lease up (a retry): the next copy of the stage takes over at once."""

        def decide(r: JobRecord, now: float) -> tuple[bool, JobRecord | None]:
            if r.run_id != run_id or r.lease_token != token or r.terminal:
                return False, None
            # No holder any more (not a dead one): the next copy takes over without counting a takeover.
            return True, replace(r, lease_token=None, lease_until=0.0, sweep_due=now + self.grace)

        released, _ = self._transition(uuid, decide)
        return bool(released)

    def hand_off(self, uuid: str, run_id: str, token: str, next_payload: dict[str, Any]) -> Step:
        """The holder finished its stage: the run waits for the next stage (up to SAMSEG_STALE_RUN_SECONDS in a
        queue's backlog before the sweeper republishes it). LOST: the lease was lost — publish nothing;
        CANCELED: a cancel was pending, the run ended `canceled` instead — queue its callback, publish nothing."""

        def decide(r: JobRecord, now: float) -> tuple[Step, JobRecord | None]:
            if r.run_id != run_id or r.lease_token != token or r.terminal:
                return Step.LOST, None
            if r.cancel_requested:
                return Step.CANCELED, self._ended(r, JobState.CANCELED, None, now)
            return Step.DONE, replace(
                r,
                lease_token=None,
                lease_until=0.0,
                payload=next_payload,
                handed_off=True,
                sweep_due=now + self.jobs.stale_after_seconds,
            )

        step, _ = self._transition(uuid, decide)
        step = Step.LOST if step is None else step
        log.info("lifecycle_hand_off", job_uuid=uuid, run_id=run_id, step=step.value)
        return Step(step)

    def complete(self, uuid: str, run_id: str, token: str) -> Step:
        """The notify stage's holder ends the run `completed` and opens its callback outbox, in one write
        (`canceled` instead if a cancel reached the run first)."""

        def decide(r: JobRecord, now: float) -> tuple[Step, JobRecord | None]:
            if r.run_id != run_id or r.lease_token != token or r.terminal:
                return Step.LOST, None
            if r.cancel_requested:
                return Step.CANCELED, self._ended(r, JobState.CANCELED, None, now)
            return Step.DONE, self._ended(r, JobState.COMPLETED, None, now)

        step, _ = self._transition(uuid, decide)
        step = Step.LOST if step is None else step
        log.info("lifecycle_complete", job_uuid=uuid, run_id=run_id, step=step.value)
        return Step(step)

    def end_canceled(self, uuid: str, run_id: str, token: str) -> Step:
        """The holder saw the pending cancel in the middle of its work (samseg.core.errors.JobCanceled): end the
        run `canceled` and open its outbox. LOST: it no longer holds the run (another copy will end it)."""

        def decide(r: JobRecord, now: float) -> tuple[Step, JobRecord | None]:
            if r.run_id != run_id or r.lease_token != token or r.terminal:
                return Step.LOST, None
            return Step.CANCELED, self._ended(r, JobState.CANCELED, None, now)

        step, _ = self._transition(uuid, decide)
        return Step.LOST if step is None else Step(step)

    def cancel(self, uuid: str) -> tuple[CancelOutcome, JobRecord | None]:
        """Cancel the job's current run (DELETE /jobs/{uuid}, or a cancel message): one conditional write.

        A run no stage holds (queued, between stages, or its holder's lease ran out) ends `canceled` now, its
        callback queued in the same write. A run a stage holds is marked `cancel_requested`: only the holder
        may end it (at its next boundary: the segmenter checks between decoder batches), so a `running` event
        it is sending never arrives after the terminal callback; if the holder dies, the copy that takes over
        (or the sweeper) ends it. Returns the outcome and the record as written (or as found).
        """

        def decide(r: JobRecord, now: float) -> tuple[CancelOutcome, JobRecord | None]:
            if r.terminal:
                return CancelOutcome.TERMINAL, None
            if r.lease_token is not None and r.lease_until > now:
                if r.cancel_requested:
                    return CancelOutcome.REQUESTED, None
                # The sweeper looks once the lease would run out: a holder that died never saw the cancel.
                return CancelOutcome.REQUESTED, replace(r, cancel_requested=True, sweep_due=r.lease_until + self.grace)
            if r.run_id is None:  # a POST /jobs placeholder: the canceled run needs an id for its webhook-id
                r = replace(r, run_id=secrets.token_hex(6), claimed_at=now)
            return CancelOutcome.CANCELED, self._ended(r, JobState.CANCELED, None, now)

        outcome, written = self._transition(uuid, decide)
        if outcome is None:
            return CancelOutcome.UNKNOWN, None
        log.info("lifecycle_cancel", job_uuid=uuid, outcome=outcome.value)
        return CancelOutcome(outcome), written or self.jobs.get(uuid)

    def fail(
        self,
        uuid: str,
        run_id: str,
        error: ErrorInfo,
        *,
        token: str | None = None,
        stage: Stage | None = None,
        lease_expired: bool = False,
        result_missing: bool = False,
    ) -> bool:
        """End the run `failed` and open its callback outbox, in one write — only if the failing copy may:

        with `token`, only the lease's holder; with `stage`, only while that stage is still current (and, with
        `lease_expired`, only once its holder is gone); with neither (a run that never started a stage), only
        while it is queued. Never once persist handed the run on: its result is published, so the run can only
        complete (the sweeper completes it if notify keeps getting lost) — unless `result_missing` (notify found
        the published result gone). False: the run moved on, ended, or another copy holds it — nothing is sent.
        """

        def decide(r: JobRecord, now: float) -> tuple[bool, JobRecord | None]:
            if r.run_id != run_id or r.terminal:
                return False, None
            if token is not None and r.lease_token != token:
                return False, None
            if token is None and stage is None and r.status is not JobState.QUEUED:
                return False, None
            if stage is not None and (r.stage is not stage or (r.status is JobState.QUEUED)):
                return False, None
            if lease_expired and r.lease_token is not None and r.lease_until > now:
                return False, None
            if published(r) and not result_missing:
                return False, None
            if r.cancel_requested:  # the app server asked to stop: it hears `canceled`, not why the stage failed
                return True, self._ended(r, JobState.CANCELED, None, now)
            return True, self._ended(r, JobState.FAILED, error, now)

        done, _ = self._transition(uuid, decide)
        log.info(
            "lifecycle_failed" if done else "lifecycle_fail_refused",
            job_uuid=uuid,
            run_id=run_id,
            code=error.code,
            stage=stage.value if stage else None,
        )
        return bool(done)

    def adopt_failed(self, uuid: str, run_id: str) -> bool:
        """A run an earlier samseg failed without an outbox: open it (True: a callback attempt is due)."""

        def decide(r: JobRecord, now: float) -> tuple[bool, JobRecord | None]:
            if r.run_id != run_id or r.status is not JobState.FAILED:
                return False, None
            if r.callback is not None:
                return r.callback.open, None
            outbox = CallbackStatus(delivered=False, attempts=0, state=OutboxState.PENDING, next_attempt_at=now)
            return True, replace(r, callback=outbox, sweep_due=now + self.grace)

        opened, _ = self._transition(uuid, decide)
        return bool(opened)

    def _ended(self, r: JobRecord, state: JobState, error: ErrorInfo | None, now: float) -> JobRecord:
        outbox = CallbackStatus(delivered=False, attempts=0, state=OutboxState.PENDING, next_attempt_at=now)
        return replace(
            r,
            status=state,
            stage=None,
            error=error,
            finished_at=r.finished_at or now,
            lease_token=None,
            lease_until=0.0,
            handed_off=False,
            cancel_requested=False,
            callback=outbox,
            sweep_due=now + self.grace,
        )

    # --- the callback outbox ---------------------------------------------------------------------------------
    def begin_send(self, uuid: str, run_id: str) -> SendTicket | None:
        """Take the send marker of the run's callback if an attempt is due; None: nothing to send now."""
        timeout = self.settings.callback_timeout_seconds

        def decide(r: JobRecord, now: float) -> tuple[SendTicket | None, JobRecord | None]:
            box = r.callback
            if r.run_id != run_id or not r.terminal or box is None or r.run_id is None:
                return None, None
            stale_marker = box.state is OutboxState.SENDING and (box.sending_until or 0) < now
            due = box.state is OutboxState.PENDING and (box.next_attempt_at or 0) <= now + 1
            if not (due or stale_marker):
                return None, None
            if stale_marker and not self._reclaimable(box, now):
                return None, self._reclaiming(r, box, now)
            if not self.settings.app_server_url:
                skipped = box.model_copy(update={"state": OutboxState.SKIPPED, "error": "no app server configured"})
                return None, replace(r, callback=skipped, sweep_due=None)
            marker = now + 2 * timeout + 10  # one attempt's connect and read, with room to record the answer
            ticket = SendTicket(uuid, r.run_id, r.status, r.error, box.attempts + 1, marker)
            sending = box.model_copy(
                update={
                    "state": OutboxState.SENDING,
                    "sending_until": marker,
                    "reclaim_at": None,
                    "first_attempt_at": box.first_attempt_at or now,
                }
            )
            return ticket, replace(r, callback=sending, sweep_due=marker + self.grace)

        ticket, _ = self._transition(uuid, decide)
        return ticket if isinstance(ticket, SendTicket) else None

    @staticmethod
    def _reclaimable(box: CallbackStatus, now: float) -> bool:
        """A stale marker may be taken over: its reclaim window, opened by an earlier look, has passed."""
        return box.reclaim_at is not None and box.reclaim_at <= now

    def _reclaiming(self, r: JobRecord, box: CallbackStatus, now: float) -> JobRecord | None:
        """The first look at a stale marker: open its reclaim window (once), and look again when it closes."""
        if box.reclaim_at is not None:
            return None  # already open
        until = now + SEND_RECLAIM_SECONDS
        return replace(r, callback=box.model_copy(update={"reclaim_at": until}), sweep_due=until)

    def record_attempt(self, ticket: SendTicket, result: AttemptResult) -> CallbackStatus | None:
        """Record one attempt's outcome under its marker; the outbox afterwards (None: the marker was lost)."""

        def decide(r: JobRecord, now: float) -> tuple[CallbackStatus | None, JobRecord | None]:
            box = r.callback
            if r.run_id != ticket.run_id or box is None or box.state is not OutboxState.SENDING:
                return None, None
            if box.sending_until != ticket.marker:
                return None, None
            attempts = box.attempts + 1
            update: dict[str, Any] = {
                "attempts": attempts,
                "http_status": result.http_status,
                "error": result.error,
                "sending_until": None,
                "reclaim_at": None,
            }
            if result.delivered:
                update |= {"state": OutboxState.DELIVERED, "delivered": True, "next_attempt_at": None, "error": None}
            elif result.give_up:
                update |= {"state": OutboxState.REJECTED, "next_attempt_at": None}
            elif result.http_status == 410:
                update |= {"state": OutboxState.GONE, "next_attempt_at": None}
            elif result.http_status is not None and result.http_status not in RETRYABLE_STATUS:
                update |= {"state": OutboxState.REJECTED, "next_attempt_at": None}
            else:
                delay = backoff_delay(attempts - 1, self.settings, result.retry_after)
                horizon = (box.first_attempt_at or now) + self.settings.callback_horizon_seconds
                if attempts >= self.settings.callback_max_attempts or now + delay > horizon:
                    update |= {"state": OutboxState.EXPIRED, "next_attempt_at": None}
                else:
                    update |= {"state": OutboxState.PENDING, "next_attempt_at": now + delay}
            after = box.model_copy(update=update)
            pending = after.state is OutboxState.PENDING and after.next_attempt_at is not None
            due = (after.next_attempt_at or now) + self.grace if pending else None
            return after, replace(r, callback=after, sweep_due=due)

        outbox, _ = self._transition(ticket.uuid, decide)
        return outbox if isinstance(outbox, CallbackStatus) else None

    # --- the sweeper -----------------------------------------------------------------------------------------
    def sweep(self, limit: int = 500) -> list[SweepAction]:
        """Resolve every record the sweep index says is overdue; the publishes the worker must make."""
        actions: list[SweepAction] = []
        for candidate in self.jobs.backend.sweep_due_before(self.clock(), limit):
            try:
                action = self._sweep_one(candidate.uuid)
            except Exception as exc:  # one bad record never stops the sweep
                log.error("sweep_record_failed", job_uuid=candidate.uuid, error=repr(exc))
                continue
            if action is not None:
                actions.append(action)
        return actions

    def _sweep_one(self, uuid: str) -> SweepAction | None:
        def decide(r: JobRecord, now: float) -> tuple[SweepAction | None, JobRecord | None]:
            run_id = r.run_id
            if r.sweep_due is None or r.sweep_due > now or run_id is None:
                return None, None  # the index lagged, or someone acted meanwhile
            if r.terminal:
                return self._sweep_outbox(r, now)
            if r.cancel_requested and not (r.lease_token is not None and r.lease_until > now):
                # Its holder stopped without ending it (died): the cancel ends it now.
                return SweepAction(SweepKind.FAILED, r.uuid, run_id), self._ended(r, JobState.CANCELED, None, now)
            republish = self._stuck_stage(r, now)
            if republish is None:
                return None, None
            stage, payload = republish
            if published(r) and (r.republished >= self.settings.sweep_max_republish or payload is None):
                # notify keeps getting lost, but the result is published: the run completed.
                return SweepAction(SweepKind.FAILED, r.uuid, run_id), self._ended(r, JobState.COMPLETED, None, now)
            if r.republished >= self.settings.sweep_max_republish or payload is None:
                error = ErrorInfo(
                    code="stalled",
                    message=f"{stage.value} made no progress after {r.republished} republishes; the run is ended",
                )
                failed = self._ended(r, JobState.FAILED, error, now)
                return SweepAction(SweepKind.FAILED, r.uuid, run_id), failed
            if r.status is JobState.QUEUED:
                # The sweeper now holds the claim it republishes: a redelivered original is a duplicate.
                r = replace(r, published=True, claimed_at=now)
            successor = replace(r, republished=r.republished + 1, sweep_due=now + self.jobs.stale_after_seconds)
            return SweepAction(SweepKind.REPUBLISH, r.uuid, run_id, stage, payload), successor

        action, _ = self._transition(uuid, decide)
        if isinstance(action, SweepAction):
            log.warning(
                "sweep_action",
                job_uuid=uuid,
                run_id=action.run_id,
                action=action.kind.value,
                stage=action.stage.value if action.stage else None,
            )
            return action
        return None

    def _stuck_stage(self, r: JobRecord, now: float) -> tuple[Stage, dict[str, Any] | None] | None:
        """Which stage to republish for a live run whose sweep is due (None: nothing is stuck)."""
        if r.status is JobState.QUEUED:
            if not r.published and now - r.claimed_at < PUBLISH_LEASE_SECONDS:
                return None  # its publisher may still be at work
            return Stage.DOWNLOAD, r.payload
        if r.stage is None:
            return None
        if r.handed_off:
            nxt = STAGE_ORDER.index(r.stage) + 1
            return (STAGE_ORDER[nxt], r.payload) if nxt < len(STAGE_ORDER) else None
        if r.lease_token is not None and r.lease_until > now:
            return None  # renewed meanwhile
        return r.stage, r.payload

    def _sweep_outbox(self, r: JobRecord, now: float) -> tuple[SweepAction | None, JobRecord | None]:
        box = r.callback
        assert r.run_id is not None
        if box is None or not box.open:
            return None, replace(r, sweep_due=None)
        if box.state is OutboxState.SENDING:
            if (box.sending_until or 0) >= now:
                return None, None
            if not self._reclaimable(box, now):
                return None, self._reclaiming(r, box, now)
            box = box.model_copy(
                update={"state": OutboxState.PENDING, "sending_until": None, "reclaim_at": None, "next_attempt_at": now}
            )
        # The attempt's own message was lost (or waits in a backlog): queue one; look again after a while.
        return SweepAction(SweepKind.DELIVER, r.uuid, r.run_id), replace(
            r, callback=box, sweep_due=now + 5 * self.grace
        )
