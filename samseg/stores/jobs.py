"""Job records: one per uuid, shared by every host, and every write to it conditional.

A record says which run of a job is current (`run_id`), which SQS message started it, whether its chain
was published, and where it is: queued → running (download, segment, persist, notify) → completed | failed.
Two backends implement the same small set of atomic operations — SQLite (one host, the embedded default)
and DynamoDB (several hosts) — and the decisions built on them live here, once:

- `claim`: the ingress's idempotency check. Creating the record is one put-if-absent; taking over an
  existing one (a failed run, a stale run, a POST /jobs placeholder, a crashed publisher) is one
  compare-and-swap on the record's `version`, so two consumers can never both win.
- `advance`: a status write names its run and is refused when the record belongs to another run or when
  it would move the job backwards (the rank of running:segment is below running:persist, terminal states
  are final except for recording the callback's delivery on the same terminal state).
- `create_queued`: POST /jobs's placeholder, written only if no record exists.
"""

from __future__ import annotations

import json
import secrets
import time
from dataclasses import dataclass, replace
from enum import StrEnum
from typing import Any, Protocol

from samseg.core.contracts import CallbackStatus, ErrorInfo, JobState, JobStatus, OutboxState, Stage

# How long a consumer that claimed a message has to publish its chain before another delivery of the same
# SQS message may take over (the first one crashed or lost SQS in between).
PUBLISH_LEASE_SECONDS = 60.0
CLAIM_ATTEMPTS = 8

RANKS: dict[tuple[JobState, Stage | None], int] = {
    (JobState.QUEUED, None): 0,
    (JobState.RUNNING, Stage.DOWNLOAD): 1,
    (JobState.RUNNING, Stage.SEGMENT): 2,
    (JobState.RUNNING, Stage.PERSIST): 3,
    (JobState.RUNNING, Stage.NOTIFY): 4,
    (JobState.COMPLETED, None): 5,
    (JobState.FAILED, None): 5,
    (JobState.CANCELED, None): 5,
}
TERMINAL_RANK = 5


def rank(state: JobState, stage: Stage | None) -> int:
    try:
        return RANKS[(state, stage)]
    except KeyError:
        raise ValueError(f"{state.value} cannot have stage {stage}") from None


class Decision(StrEnum):
    RUN = "run"  # publish a chain for this delivery
    ALREADY_PUBLISHED = "already_published"  # this very message already started its run: delete it
    BUSY = "busy"  # another consumer holds this very message right now: hand it back for later
    DUPLICATE = "duplicate"  # another message for a job that is in progress or done: delete it
    CONFLICT = "conflict"  # the same uuid with another body while a run is active: dead-letter it (uuid_conflict)
    REDELIVER = "redeliver"  # the same body after `completed`: the outbox was reopened, send the same callback


@dataclass(frozen=True)
class JobRecord:
    uuid: str
    status: JobState
    stage: Stage | None
    updated_at: float
    run_id: str | None = None
    message_id: str | None = None
    published: bool = False
    claimed_at: float = 0.0
    finished_at: float | None = None
    error: ErrorInfo | None = None
    callback: CallbackStatus | None = None
    assets_purged: bool = False
    version: int = 0
    # --- the lifecycle's bookkeeping (samseg.worker.lifecycle) -------------------------------------------------
    # The stage attempt that holds the run (a random token) and until when; None when no stage works on it.
    lease_token: str | None = None
    lease_until: float = 0.0
    # The current stage's input while a stage holds the run; the next stage's input once it `handed_off`:
    # what the sweeper republishes when a message is lost.
    payload: dict[str, Any] | None = None
    handed_off: bool = False
    republished: int = 0
    # How often a copy of the current stage took the run over from a holder that died (its lease ran out).
    takeovers: int = 0
    # When the sweeper should look at this record (an index of active runs); None: nothing can get stuck.
    sweep_due: float | None = None
    # What the run was asked to do (samseg.core.options.fingerprint: image_url, options, outputs): a re-sent
    # uuid with the same fingerprint is the same job, with another one a conflict while the run is active.
    fingerprint: str | None = None
    # A cancel reached the run while a stage held it: the holder ends it `canceled` at its next boundary.
    cancel_requested: bool = False

    @property
    def rank(self) -> int:
        return rank(self.status, self.stage)

    @property
    def terminal(self) -> bool:
        return self.status in TERMINAL_STATES

    def to_status(self) -> JobStatus:
        error = self.error
        box = self.callback
        if error is None and box is not None and box.state in UNDELIVERED:
            # The job's outcome stays `completed`; that the app server never took the callback is an error of
            # its own (the outbox says why: rejected, gone, expired).
            error = ErrorInfo(code="callback_failed", message=f"the callback was not accepted: {box.error}")
        return JobStatus(
            uuid=self.uuid,
            status=self.status,
            stage=self.stage,
            updated_at=self.updated_at,
            run_id=self.run_id,
            error=error,
            callback=self.callback,
            cancel_requested=True if self.cancel_requested and not self.terminal else None,
        )


UNDELIVERED = frozenset({OutboxState.REJECTED, OutboxState.GONE, OutboxState.EXPIRED})
TERMINAL_STATES = frozenset({JobState.COMPLETED, JobState.FAILED, JobState.CANCELED})


LIFECYCLE_FIELDS = (
    "lease_token",
    "lease_until",
    "payload",
    "handed_off",
    "republished",
    "takeovers",
    "fingerprint",
    "cancel_requested",
)


def lifecycle_fields(record: JobRecord) -> dict[str, Any]:
    """The lifecycle's bookkeeping as one JSON-able dict (each backend stores it as one attribute)."""
    return {name: getattr(record, name) for name in LIFECYCLE_FIELDS}


def parse_lifecycle_fields(text: str | None) -> dict[str, Any]:
    data = json.loads(text) if text else {}
    return {name: data[name] for name in LIFECYCLE_FIELDS if name in data}


@dataclass(frozen=True)
class Claim:
    decision: Decision
    record: JobRecord

    @property
    def run_id(self) -> str:
        assert self.record.run_id is not None
        return self.record.run_id


class StoreConflict(RuntimeError):
    """A compare-and-swap lost CLAIM_ATTEMPTS times in a row: an unusual storm of deliveries of one uuid."""


class JobBackend(Protocol):
    """The atomic operations a store must provide; `JobStore` builds every decision from these."""

    def ensure(self) -> None:
        """Create the table (and its indexes) if missing."""
        ...

    def get(self, uuid: str) -> JobRecord | None: ...

    def insert(self, record: JobRecord) -> bool:
        """Write `record` only if no record has its uuid."""
        ...

    def swap(self, expected_version: int, record: JobRecord) -> bool:
        """Replace the record only if its version is still `expected_version` (record.version is the new one)."""
        ...

    def advance(
        self,
        uuid: str,
        run_id: str,
        state: JobState,
        stage: Stage | None,
        now: float,
        error: ErrorInfo | None,
        callback: CallbackStatus | None,
    ) -> bool:
        """Set the status if the record belongs to `run_id` and the move does not go backwards."""
        ...

    def mark_published(self, uuid: str, run_id: str) -> bool: ...

    def finished_before(self, before: float, limit: int) -> list[JobRecord]:
        """Finished jobs whose assets were not purged yet, oldest first (an index, not a scan)."""
        ...

    def sweep_due_before(self, before: float, limit: int) -> list[JobRecord]:
        """Records whose `sweep_due` is before `before`, earliest first (a sparse index of active runs)."""
        ...

    def mark_purged(self, uuid: str, run_id: str | None, finished_at: float) -> bool:
        """Record that the run's assets are gone, if the record still describes that finished run."""
        ...

    def delete_expired(self, now: float, limit: int = 1000) -> int:
        """Remove records past their TTL, where the store has no TTL of its own (SQLite)."""
        ...

    def describe(self) -> str: ...


class JobStore:
    """The job-state operations samseg's stages, ingress, purge and API use."""

    def __init__(self, backend: JobBackend, stale_after_seconds: float, sweep_grace_seconds: float = 60.0) -> None:
        self.backend = backend
        self.stale_after_seconds = stale_after_seconds
        self.sweep_grace_seconds = sweep_grace_seconds

    def ensure(self) -> None:
        self.backend.ensure()

    def get(self, uuid: str) -> JobRecord | None:
        return self.backend.get(uuid)

    def status(self, uuid: str) -> JobStatus | None:
        record = self.backend.get(uuid)
        return record.to_status() if record else None

    def create_queued(
        self, uuid: str, now: float | None = None, message_id: str | None = None, fingerprint: str | None = None
    ) -> bool:
        """POST /jobs: a placeholder so the job is visible at once; never overwrites an existing record.

        `message_id` is the SQS message POST /jobs sent: if the job is canceled before the ingress takes that
        message, the message finds its own canceled placeholder and is dropped, not run."""
        now = time.time() if now is None else now
        placeholder = JobRecord(
            uuid=uuid,
            status=JobState.QUEUED,
            stage=None,
            updated_at=now,
            message_id=message_id,
            fingerprint=fingerprint,
        )
        return self.backend.insert(placeholder)

    def claim(
        self,
        uuid: str,
        message_id: str | None,
        now: float | None = None,
        payload: dict[str, Any] | None = None,
        fingerprint: str | None = None,
    ) -> Claim:
        """Decide what a delivery of a job message does; RUN is returned to exactly one consumer per run.

        `payload` is the first stage's input without its run id (the sweeper republishes it if the chain is lost);
        `fingerprint` says what the job asks for (samseg.core.options.fingerprint), for the re-send rules.
        """
        for _ in range(CLAIM_ATTEMPTS):
            at = time.time() if now is None else now
            run_id = secrets.token_hex(6)
            fresh = JobRecord(
                uuid=uuid,
                status=JobState.QUEUED,
                stage=None,
                updated_at=at,
                run_id=run_id,
                message_id=message_id,
                claimed_at=at,
                payload={**payload, "run_id": run_id} if payload is not None else None,
                handed_off=True,
                # Unpublished: the sweeper takes it over once the publish lease is over.
                sweep_due=at + PUBLISH_LEASE_SECONDS + self.sweep_grace_seconds,
                fingerprint=fingerprint,
            )
            if self.backend.insert(fresh):
                return Claim(Decision.RUN, fresh)
            current = self.backend.get(uuid)
            if current is None:
                continue  # deleted in between: try to create it again
            decision, successor = self._decide(current, fresh, at)
            if successor is None:
                return Claim(decision, current)
            if self.backend.swap(current.version, successor):
                return Claim(decision, successor)
        raise StoreConflict(f"could not claim job {uuid}: the record kept changing")

    def _decide(self, current: JobRecord, fresh: JobRecord, now: float) -> tuple[Decision, JobRecord | None]:
        """What `current` means for a new delivery; the successor record when this delivery takes over (RUN) or
        reopens the finished run's callback outbox (REDELIVER).

        The re-send rules (docs/contract.md): the same body while a run is active is a duplicate, another body a
        conflict; the same body after `completed`, while its result is stored, sends the same callback again
        without running the model; after `failed`/`canceled`, or another body after `completed`, a new run.
        """
        take_over = replace(fresh, version=current.version + 1)
        if fresh.message_id is not None and current.message_id == fresh.message_id and current.terminal:
            return Decision.DUPLICATE, None  # this very message's job was canceled before it started (POST /jobs)
        if current.run_id is None:  # POST /jobs placeholder: no run yet
            return Decision.RUN, take_over
        if fresh.message_id is not None and current.message_id == fresh.message_id:
            if current.published:
                return Decision.ALREADY_PUBLISHED, None
            if now - current.claimed_at < PUBLISH_LEASE_SECONDS:
                return Decision.BUSY, None
            # The consumer that claimed this message died before publishing: resume the same run.
            return Decision.RUN, replace(
                current, claimed_at=now, sweep_due=fresh.sweep_due, version=current.version + 1
            )
        same = current.fingerprint == fresh.fingerprint
        if current.status is JobState.QUEUED and not current.published:
            if now - current.claimed_at >= PUBLISH_LEASE_SECONDS:
                return Decision.RUN, take_over  # its publisher died before publishing: this delivery takes over
            return (Decision.DUPLICATE if same else Decision.CONFLICT), None
        if current.status in (JobState.FAILED, JobState.CANCELED):
            return Decision.RUN, take_over  # an app server may resend a failed or canceled job
        if current.status is JobState.COMPLETED:
            if not same or current.assets_purged:
                return Decision.RUN, take_over
            box = current.callback
            if box is not None and box.open:
                return Decision.DUPLICATE, None  # its callback is on its way already
            reopened = CallbackStatus(delivered=False, attempts=0, state=OutboxState.PENDING, next_attempt_at=now)
            return Decision.REDELIVER, replace(
                current,
                callback=reopened,
                sweep_due=now + self.sweep_grace_seconds,
                updated_at=now,
                version=current.version + 1,
            )
        if now - current.updated_at > self.stale_after_seconds:
            return Decision.RUN, take_over  # no progress for longer than any stage may take: its run is dead
        return (Decision.DUPLICATE if same else Decision.CONFLICT), None

    def mark_published(self, uuid: str, run_id: str, now: float | None = None) -> bool:
        """The run's chain is on SQS. Until its download starts, the sweeper looks again only after the longest
        wait a queue may impose (SAMSEG_STALE_RUN_SECONDS): a backlog is not a lost message."""
        for _ in range(CLAIM_ATTEMPTS):
            current = self.backend.get(uuid)
            if current is None or current.run_id != run_id:
                return False
            if current.published:
                return True
            at = time.time() if now is None else now
            successor = replace(
                current,
                published=True,
                sweep_due=at + self.stale_after_seconds if current.status is JobState.QUEUED else current.sweep_due,
                version=current.version + 1,
            )
            if self.backend.swap(current.version, successor):
                return True
        raise StoreConflict(f"could not mark job {uuid} published: the record kept changing")

    def advance(
        self,
        uuid: str,
        run_id: str,
        state: JobState,
        stage: Stage | None = None,
        *,
        error: ErrorInfo | None = None,
        callback: CallbackStatus | None = None,
        now: float | None = None,
    ) -> bool:
        rank(state, stage)  # refuses impossible combinations before they reach the store
        at = time.time() if now is None else now
        return self.backend.advance(
            uuid, run_id, state, stage if state is JobState.RUNNING else None, at, error, callback
        )

    def finished_before(self, before: float, limit: int) -> list[JobRecord]:
        return self.backend.finished_before(before, limit)

    def record_invalid(self, uuid: str, error: ErrorInfo, now: float | None = None) -> JobRecord | None:
        """A malformed message with a readable uuid: a failed run of its own, unless the uuid has a record."""
        at = time.time() if now is None else now
        record = JobRecord(
            uuid=uuid,
            status=JobState.FAILED,
            stage=None,
            updated_at=at,
            run_id=secrets.token_hex(6),
            published=True,
            claimed_at=at,
            finished_at=at,
            error=error,
            # Its `failed` callback goes through the outbox like any other (samseg.worker.lifecycle).
            callback=CallbackStatus(delivered=False, attempts=0, state=OutboxState.PENDING, next_attempt_at=at),
            sweep_due=at + self.sweep_grace_seconds,
        )
        return record if self.backend.insert(record) else None

    def mark_purged(self, record: JobRecord) -> bool:
        assert record.finished_at is not None
        return self.backend.mark_purged(record.uuid, record.run_id, record.finished_at)
