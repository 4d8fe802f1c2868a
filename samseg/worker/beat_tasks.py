"""The tasks celery beat schedules (samseg.worker.config's `beat_schedule`): the purge and the dead-task reaper."""

from __future__ import annotations

import structlog
from celery import shared_task

from samseg.core.contracts import ErrorInfo
from samseg.queue.dead_letters import DeadLetter, reap_task_dead_letters
from samseg.queue.sqs import JobQueues
from samseg.stores.purge import purge_expired
from samseg.worker import chain as names
from samseg.worker.base import StageTask
from samseg.worker.failure import fail_run

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
        fail_run(self.app, self.stores, dead.job_uuid, dead.run_id, error, callback=dead.task != names.NOTIFY)
        return True

    return reap_task_dead_letters(JobQueues(self.settings), handle)


@shared_task(name=names.PURGE, bind=True, base=StageTask)
def purge(self: StageTask) -> dict[str, int]:
    """Beat, every SAMSEG_CLEANUP_INTERVAL_SECONDS: remove the assets of jobs older than SAMSEG_ASSET_TTL_SECONDS."""
    report = purge_expired(self.stores, self.settings)
    log.info("assets_purged", ttl_seconds=self.settings.asset_ttl_seconds, **report)
    return report
