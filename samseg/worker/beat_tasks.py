"""The tasks celery beat schedules (samseg.worker.config's `beat_schedule`): the sweeper, the dead-task reaper
and the purge."""

from __future__ import annotations

import time

import structlog
from celery import shared_task

from samseg.core.contracts import ErrorInfo, Stage
from samseg.queue.dead_letters import DeadLetter, reap_task_dead_letters
from samseg.queue.sqs import JobQueues
from samseg.stores.lifecycle import SweepKind
from samseg.stores.purge import purge_expired
from samseg.worker import chain as names
from samseg.worker.base import StageTask
from samseg.worker.chain import chain_from, queue_delivery
from samseg.worker.failure import TASK_STAGES, end_failed_run

log = structlog.get_logger(__name__)


@shared_task(name=names.REAP_DEAD_TASKS, bind=True, base=StageTask)
def reap_dead_tasks(self: StageTask) -> int:
    """Beat, every minute: stage messages SQS dead-lettered (their worker died on every delivery — the kernel's
    OOM killer on one huge image, a segfault) end their run as failed with `worker_lost`."""

    def handle(letter: DeadLetter) -> bool:
        dead = letter.task
        if dead is None or dead.job_uuid is None or dead.run_id is None:
            log.error("dead_task_unreadable", message_id=letter.message_id, error=letter.error, body=letter.body[:300])
            return True  # nothing to end; it stays visible in the log
        error = ErrorInfo(
            code="worker_lost",
            message=f"{dead.task} killed its worker on each of {letter.receive_count} deliveries (out of memory?)",
        )
        failure = {
            "uuid": dead.job_uuid,
            "run_id": dead.run_id,
            "error": error.model_dump(),
            "token": None,
            "stage": TASK_STAGES[dead.task].value if dead.task in TASK_STAGES else None,
            "lease_expired": True,  # its holder died on every delivery; never fail a run another copy holds
        }
        if end_failed_run(self.app, self.lifecycle, failure, self.stores.assets):
            return True
        record = self.stores.jobs.get(dead.job_uuid)
        holder_alive = (
            record is not None
            and record.run_id == dead.run_id
            and not record.terminal
            and record.lease_token is not None
            and record.lease_until > time.time()
        )
        # Its last holder's lease has not run out yet: keep the letter, it comes back for the next reap.
        return not holder_alive

    return reap_task_dead_letters(JobQueues(self.settings), handle)


@shared_task(name=names.PURGE, bind=True, base=StageTask)
def purge(self: StageTask) -> dict[str, int]:
    """Beat, every SAMSEG_CLEANUP_INTERVAL_SECONDS: remove the assets of jobs older than SAMSEG_ASSET_TTL_SECONDS."""
    report = purge_expired(self.stores, self.settings)
    log.info("assets_purged", ttl_seconds=self.settings.asset_ttl_seconds, **report)
    return report


@shared_task(name=names.SWEEP, bind=True, base=StageTask)
def sweep(self: StageTask) -> dict[str, int]:
    """Beat, every minute: resolve every run the index of active runs says is overdue (samseg.stores.lifecycle):
    republish a stage or chain whose message is gone, queue a callback attempt whose message is gone, fail a
    run whose stage keeps getting stuck (`stalled`). Costs in proportion to the active runs, not the table."""
    counts = {kind.value: 0 for kind in SweepKind}
    for action in self.lifecycle.sweep():
        counts[action.kind.value] += 1
        if action.kind is SweepKind.REPUBLISH and action.stage is not None and action.payload is not None:
            chain_from(self.app, action.stage, action.payload).apply_async()
            if action.stage is Stage.DOWNLOAD:
                self.stores.jobs.mark_published(action.uuid, action.run_id)
        else:
            queue_delivery(self.app, action.uuid, action.run_id)
    if any(counts.values()):
        log.info("sweep_done", **counts)
    return counts
