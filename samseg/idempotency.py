"""One run per job uuid, although SQS delivers at least once.

The idempotency key is the job's `uuid`. The first ingress to see a uuid creates a claim file with
O_CREAT|O_EXCL on the shared assets volume (atomic on local filesystems and NFSv3+), records which SQS
message it came from, and marks it published once the chain is on its queue. Later deliveries decide from
the claim and the job's status:

- the same SQS message again (ingress crashed before deleting it): publish if it was not yet published,
  else just delete it;
- another message with the same uuid: ignored while the job is queued, running or completed (the second
  run is a no-op); a `failed` job, or one whose status went stale (no progress for longer than the
  visibility timeout plus the segment time limit), is run again — an app server may resend a failed job.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import time
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from samseg.contracts import JobState, JobStatus


class Decision(StrEnum):
    RUN = "run"  # publish a chain for this delivery
    ALREADY_PUBLISHED = "already_published"  # same message, chain already on its way: delete the message
    DUPLICATE = "duplicate"  # another message for a job that is in progress or done: delete it


@dataclass(frozen=True)
class Claim:
    run_id: str
    message_id: str | None
    published: bool
    created_at: float


class Claims:
    def __init__(self, folder: Path, stale_after_seconds: float) -> None:
        self.folder = folder
        self.stale_after_seconds = stale_after_seconds

    def decide(self, uuid: str, message_id: str | None, status: JobStatus | None) -> tuple[Decision, Claim]:
        self.folder.mkdir(parents=True, exist_ok=True)
        fresh = Claim(run_id=secrets.token_hex(6), message_id=message_id, published=False, created_at=time.time())
        if status is not None and status.run_id and not self._rerunnable(status) and not (self.folder / uuid).exists():
            # The claim is gone (purged) but a run of this job is alive or done: still a duplicate. (A status
            # without a run id was written by POST /jobs before any ingress saw the message.)
            return Decision.DUPLICATE, Claim(status.run_id, None, True, status.updated_at)
        if self._create(uuid, fresh):
            return Decision.RUN, fresh
        existing = self.read(uuid)
        if existing is None:  # unreadable claim (torn write): take it over
            self._write(uuid, fresh)
            return Decision.RUN, fresh
        if message_id is not None and existing.message_id == message_id:
            return (Decision.ALREADY_PUBLISHED if existing.published else Decision.RUN), existing
        if status is not None and not self._rerunnable(status):
            return Decision.DUPLICATE, existing
        if status is None and time.time() - existing.created_at < self.stale_after_seconds:
            return Decision.DUPLICATE, existing  # the first delivery is between claim and status write
        self._write(uuid, fresh)
        return Decision.RUN, fresh

    def mark_published(self, uuid: str, claim: Claim) -> None:
        self._write(uuid, Claim(claim.run_id, claim.message_id, True, claim.created_at))

    def read(self, uuid: str) -> Claim | None:
        try:
            data = json.loads((self.folder / uuid).read_text())
            return Claim(data["run_id"], data.get("message_id"), bool(data["published"]), float(data["created_at"]))
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def _rerunnable(self, status: JobStatus) -> bool:
        if status.status == JobState.FAILED:
            return True
        if status.status == JobState.COMPLETED:
            return False
        return time.time() - status.updated_at > self.stale_after_seconds

    def _create(self, uuid: str, claim: Claim) -> bool:
        try:
            fd = os.open(self.folder / uuid, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as out:
            out.write(_dump(claim))
        return True

    def _write(self, uuid: str, claim: Claim) -> None:
        tmp = self.folder / f".{uuid}.{secrets.token_hex(4)}.tmp"
        tmp.write_text(_dump(claim))
        os.replace(tmp, self.folder / uuid)

    def release(self, uuid: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            (self.folder / uuid).unlink()


def _dump(claim: Claim) -> str:
    return json.dumps(
        {
            "run_id": claim.run_id,
            "message_id": claim.message_id,
            "published": claim.published,
            "created_at": claim.created_at,
        }
    )
