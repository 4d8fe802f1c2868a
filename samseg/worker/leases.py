"""The stage leases this process holds, renewed by one thread so a stage that runs for minutes keeps its run.

A stage task holds its run through a lease in the job store (samseg.stores.lifecycle); the lease runs out
after SAMSEG_STAGE_LEASE_SECONDS unless renewed. The process that runs the task renews it — a pool child in a
prefork worker, the worker itself with solo/threads — every third of the lease, so a live holder is never
taken over and a dead one is within one lease. A renewal the store refuses means another copy took the run
over (this copy's lease ran out during an outage): the stage's own writes will be refused as well, and it ends
quietly at its next transition.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass

import structlog

from samseg.stores.lifecycle import Lifecycle

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class HeldLease:
    uuid: str
    run_id: str
    token: str


class LeaseKeeper:
    """Per process (re-created after a fork): the leases of the tasks running here, and their renewal thread."""

    _instance: tuple[int, LeaseKeeper] | None = None
    _instance_lock = threading.Lock()

    def __init__(self, lifecycle: Lifecycle, interval: float) -> None:
        self.lifecycle = lifecycle
        self.interval = interval
        self._held: dict[str, HeldLease] = {}
        # Leases of tasks that raised, kept (not renewed) until their errback fails the run with the token.
        self._failed: dict[str, HeldLease] = {}
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="samseg-leases", daemon=True)
        self._thread.start()

    @classmethod
    def for_process(cls, lifecycle: Lifecycle) -> LeaseKeeper:
        with cls._instance_lock:
            cached = cls._instance
            if cached is None or cached[0] != os.getpid():
                cached = cls._instance = (os.getpid(), cls(lifecycle, lifecycle.lease / 3))
            return cached[1]

    @classmethod
    def current(cls) -> LeaseKeeper | None:
        """This process's keeper, if a stage has run here (None in a process that has not held a lease)."""
        with cls._instance_lock:
            cached = cls._instance
            return cached[1] if cached is not None and cached[0] == os.getpid() else None

    def hold(self, task_id: str, lease: HeldLease) -> None:
        with self._lock:
            self._held[task_id] = lease

    def release(self, task_id: str) -> HeldLease | None:
        with self._lock:
            return self._held.pop(task_id, None)

    def get(self, task_id: str) -> HeldLease | None:
        with self._lock:
            return self._held.get(task_id)

    def failed(self, task_id: str, lease: HeldLease) -> None:
        with self._lock:
            if len(self._failed) > 1000:  # an errback that never ran: forget the oldest
                self._failed.pop(next(iter(self._failed)))
            self._failed[task_id] = lease

    def take_failed(self, task_id: str) -> HeldLease | None:
        """The lease of a task that raised (for its errback), or of a task still running (the hung-task hook)."""
        with self._lock:
            return self._failed.pop(task_id, None) or self._held.get(task_id)

    def release_all(self) -> int:
        """Give up every lease held here, in the store (best effort); returns how many the store released.

        For a process about to end with stages still running (the soft-shutdown deadline): their messages go
        back to SQS, and the next copy of each stage should take its run over at once instead of waiting out
        SAMSEG_STAGE_LEASE_SECONDS for a holder that is gone. Safe while those stages still run for a moment:
        their writes carry the released token and are refused, so the next copy alone goes on."""
        with self._lock:
            held = list(self._held.values())
            self._held.clear()
        released = 0
        for lease in held:
            try:
                released += bool(self.lifecycle.release(lease.uuid, lease.run_id, lease.token))
            except Exception as exc:  # the store is unreachable: the lease runs out by itself
                log.warning("stage_lease_release_failed", job_uuid=lease.uuid, error=repr(exc)[:300])
        return released

    def renew_all(self) -> int:
        with self._lock:
            held = list(self._held.items())
        renewed = 0
        for task_id, lease in held:
            try:
                if self.lifecycle.renew(lease.uuid, lease.run_id, lease.token):
                    renewed += 1
                else:
                    log.warning("stage_lease_lost", job_uuid=lease.uuid, run_id=lease.run_id, task_id=task_id)
            except Exception as exc:  # the store is unreachable: try again next round (the lease has slack)
                log.warning("stage_lease_renew_failed", job_uuid=lease.uuid, error=repr(exc)[:300])
        return renewed

    def _run(self) -> None:
        stop = threading.Event()
        while not stop.wait(self.interval):
            self.renew_all()


def release_held_leases() -> int:
    """Release this process's stage leases (LeaseKeeper.release_all); 0 where no stage has run."""
    keeper = LeaseKeeper.current()
    return keeper.release_all() if keeper is not None else 0
