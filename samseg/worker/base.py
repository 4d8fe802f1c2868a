"""What every samseg task shares: Settings, the stores (one set per worker process), retries through outages,
and the mapping of failures to the error codes an app server sees.

Tasks pass a small dict (`uuid`, `image_url`, `run_id`, image size, counts) — never pixels: SQS messages are
capped at 256 KiB, so the image and the masks travel as work files in the blob store, keyed by run
(`.samseg/work/{uuid}/{run_id}/…`), which every host reaches (a local directory on one host, S3 on several).
"""

from __future__ import annotations

import errno
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NoReturn

import structlog
from billiard.exceptions import TimeLimitExceeded
from botocore.exceptions import BotoCoreError, ClientError
from celery import Task
from celery.exceptions import Ignore, Reject, Retry, SoftTimeLimitExceeded

from samseg.core.contracts import ErrorInfo, Stage
from samseg.core.errors import JobError, is_transient
from samseg.core.settings import Settings, get_settings
from samseg.ops import metrics
from samseg.ops.scratch import scratch_prefix
from samseg.stores import Stores, build_stores
from samseg.stores.layout import work_key
from samseg.stores.lifecycle import Busy, Ended, Forward, Hold, Lifecycle, Step
from samseg.worker.chain import chain_from, queue_delivery
from samseg.worker.leases import HeldLease, LeaseKeeper

log = structlog.get_logger(__name__)

STAGE_RETRIES = 15


class StageTask(Task):  # type: ignore[misc]
    """Base of samseg's tasks: Settings, the stores built once per worker process (after any fork), and
    retries through outages.

    A stage that cannot reach SQS, S3 or the job store (samseg.core.errors.is_transient) is not a failed job:
    it is published again with a growing delay (5 s doubling to 5 min, STAGE_RETRIES times ≈ 1 h) and its
    message acknowledged. If even that publish fails (SQS itself is down), the acknowledgement fails too and
    SQS redelivers the message after its visibility timeout. Either way the run resumes where it stopped.
    """

    _stores: tuple[int, Stores] | None = None

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return super().__call__(*args, **kwargs)
        except (Retry, Reject, Ignore):
            self._drop_lease()
            raise  # Celery's own control flow (a retry already scheduled), whatever caused it
        except Exception as exc:
            if not is_transient(exc) or self.request.called_directly:
                self.request._samseg_failed = True  # the errback fails the run with this lease's token
                raise
            self._drop_lease()
            retries = int(self.request.retries or 0)
            delay = min(300, 5 * 2**retries)
            log.warning("stage_retry_after_outage", error=repr(exc)[:300], retries=retries, retry_in_seconds=delay)
            raise self.retry(exc=exc, countdown=delay, max_retries=STAGE_RETRIES) from exc
        finally:
            if not self.request.called_directly:
                self._release_lease_after_errback()

    def _drop_lease(self) -> None:
        """A retry gives the lease up at once (its next copy need not wait for it to run out), best effort."""
        lease = self.leases.release(self.request.id) if self.request.id else None
        if lease is not None:
            try:
                self.lifecycle.release(lease.uuid, lease.run_id, lease.token)
            except Exception as exc:  # unreachable store: the lease runs out by itself
                log.info("stage_lease_release_failed", error=repr(exc)[:200])

    def _release_lease_after_errback(self) -> None:
        """Stop renewing. A failed task's lease is kept (not renewed) for its errback, which fails the run with
        its token (samseg.worker.failure): only the holder may."""
        lease = self.leases.release(self.request.id) if self.request.id else None
        if lease is not None and getattr(self.request, "_samseg_failed", False):
            self.leases.failed(self.request.id, lease)

    @property
    def settings(self) -> Settings:
        return get_settings()

    @property
    def stores(self) -> Stores:
        """One set per process, shared by every stage task (set on StageTask itself, not on each task class)."""
        cached = StageTask._stores
        if cached is None or cached[0] != os.getpid():
            cached = StageTask._stores = (os.getpid(), build_stores(self.settings))
        return cached[1]

    @property
    def lifecycle(self) -> Lifecycle:
        return Lifecycle(self.stores.jobs, self.settings)

    @property
    def leases(self) -> LeaseKeeper:
        return LeaseKeeper.for_process(self.lifecycle)

    def hold(self, job: dict[str, Any], stage: Stage) -> HeldLease:
        """Take the run for `stage` (samseg.stores.lifecycle.start_stage), or end this copy of the task.

        Gone (the run was replaced, moved past this stage, or ended): the task ends quietly — `Ignore`, its
        message acknowledged, nothing after it published. Busy (another copy holds a live lease): the message
        is handed back as a retry that looks again once the lease would have run out.
        """
        outcome = self.lifecycle.start_stage(job["uuid"], job["run_id"], stage, payload=job)
        if isinstance(outcome, Hold):
            lease = HeldLease(job["uuid"], job["run_id"], outcome.token)
            self.leases.hold(self.request.id, lease)
            return lease
        if isinstance(outcome, Busy):
            # The retry carries the chain on (request.chain): this copy may be the one that finishes the stage.
            raise self.retry(countdown=min(60.0, outcome.retry_in + 1), max_retries=None)
        if isinstance(outcome, Ended):
            # The run was ended in that write (worker_lost, expired, or a pending cancel): send its callback.
            queue_delivery(self.app, job["uuid"], job["run_id"])
            code = outcome.error.code if outcome.error else None
            log.warning("stage_ended_run", stage=stage.value, status=outcome.state.value, code=code)
        if isinstance(outcome, Forward):
            # The stage was done but its next message may be lost: publish it again (its lease stops a duplicate).
            chain_from(self.app, outcome.stage, outcome.payload).apply_async()
            log.info("stage_forwarded", stage=stage.value, next_stage=outcome.stage.value)
        self.request.chain = None  # Gone: Celery would publish the next link from this after the task returns
        raise Ignore()

    def hand_off(self, lease: HeldLease, next_payload: dict[str, Any]) -> dict[str, Any]:
        """The stage is done: record it (only the lease's holder can), then Celery publishes the next link.

        A cancel that reached the run meanwhile ends it `canceled` in that same write: its callback is queued
        and nothing after this stage is published."""
        step = self.lifecycle.hand_off(lease.uuid, lease.run_id, lease.token, next_payload)
        if step is not Step.DONE:
            self.end_here(lease, step)
        return next_payload

    def end_here(self, lease: HeldLease, step: Step) -> NoReturn:
        """Stop the chain at this stage: LOST (another copy took the run over: it, not this one, goes on) or
        CANCELED (the run was ended `canceled` by this copy's write: queue its callback)."""
        self.request.chain = None
        if step is Step.CANCELED:
            self.discard_work(lease.uuid, lease.run_id)
            queue_delivery(self.app, lease.uuid, lease.run_id)
            metrics.instruments().jobs.labels("canceled").inc()
            log.info("job_canceled", run_id=lease.run_id)
        raise Ignore()

    def cancel_check(self, lease: HeldLease, every: float = 1.0) -> Callable[[], bool]:
        """A cheap `should_stop` for long work: True once a cancel was requested for this run (one store read
        at most every `every` seconds; a store error counts as "not canceled" — the work goes on)."""
        jobs = self.stores.jobs
        last = [0.0, False]

        def should_stop() -> bool:
            now = time.monotonic()
            if now - last[0] >= every:
                last[0] = now
                try:
                    record = jobs.get(lease.uuid)
                except Exception as exc:
                    log.info("cancel_check_failed", error=repr(exc)[:200])
                    return False
                last[1] = record is not None and record.run_id == lease.run_id and record.cancel_requested
            return bool(last[1])

        return should_stop

    @contextmanager
    def scratch(self) -> Iterator[Path]:
        """A host-local temporary folder for files on their way to or from the blob store."""
        root = self.settings.scratch_dir
        root.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=root, prefix=scratch_prefix()) as folder:
            yield Path(folder)

    def discard_work(self, uuid: str, run_id: str, *, raise_outage: bool = False) -> None:
        """Delete the run's work files once no stage of the run can need them: in notify, before the run ends
        (`raise_outage`: an unreachable store retries notify, as its own writes would, so a completed run leaves
        none behind), and where a cancel ends the run (best effort).

        Never in persist: there they are the stage's input until its hand-off is recorded. A persist that
        published, deleted them, then could not record the hand-off (the job store down, the worker killed) ran
        again from nothing and failed the job `work_missing`; once notify holds the run, no copy of persist can
        take it again (it is forwarded). A failure that is not an outage only leaves files the orphan sweep
        removes (samseg.stores.purge.sweep_orphans); it never fails a finished job.
        """
        try:
            self.stores.assets.discard_work(uuid, run_id)
        except Exception as exc:
            if raise_outage and is_transient(exc):
                raise
            log.warning("work_discard_failed", error=repr(exc)[:200])

    def fetch_work(self, job: dict[str, Any], name: str, dest: Path) -> Path:
        if not self.stores.blobs.get_file(work_key(job["uuid"], job["run_id"], name), dest):
            raise JobError("work_missing", f"the run's work file {name} is gone (purged, or another run replaced it)")
        return dest


def error_info(exc: BaseException) -> ErrorInfo:
    """The code and message an app server sees for an exception that ended a run."""
    if isinstance(exc, JobError):
        return ErrorInfo(code=exc.code, message=exc.message)
    if isinstance(exc, SoftTimeLimitExceeded | TimeLimitExceeded):
        return ErrorInfo(code="timeout", message=f"the task ran past its time limit ({exc!r})")
    return ErrorInfo(code="internal_error", message=f"{type(exc).__name__}: {exc}")


@contextmanager
def storage_errors() -> Iterator[None]:
    """Blob-store failures as job errors with a code the app server can act on."""
    try:
        yield
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise JobError("disk_full", f"no space left for the job's files: {exc}") from exc
        if is_transient(exc):
            raise  # an outage: the stage is retried (StageTask.__call__)
        raise JobError("storage_error", f"cannot read or write the job's files: {exc}") from exc
    except (ClientError, BotoCoreError) as exc:
        if is_transient(exc):
            raise
        raise JobError("storage_error", f"the object store refused the request: {exc}") from exc
