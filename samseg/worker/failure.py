"""How a run ends when it fails: the errback of every link, the one conditional `fail_run`, and the watchdog's
hard-timeout hook.

Every path that fails a run — the errback, the watchdog, the dead-letter reaper — goes through `fail_run`,
one conditional write in the job store: whichever gets there first ends the run and queues its one `failed`
callback; the others find the run already ended and send nothing.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import structlog
from celery import Celery, shared_task

from samseg.core.contracts import ErrorInfo, JobState
from samseg.core.errors import is_transient
from samseg.core.settings import Settings
from samseg.ops.watchdog import RunningTask, held_message
from samseg.queue.sqs import probe_client
from samseg.stores import Stores, build_stores
from samseg.worker import chain as names
from samseg.worker.base import STAGE_RETRIES, StageTask, error_info

log = structlog.get_logger(__name__)


@shared_task(name=names.ON_JOB_ERROR, base=StageTask)
def on_job_error(request: Any, exc: BaseException, traceback: Any) -> None:
    """Errback of every link: record the failure and queue the run's `failed` callback.

    Not `bind=True`: Celery passes (request, exc, traceback) only to errbacks whose signature has exactly
    those three parameters; the task instance (its stores, its app) is reached through its own name instead.
    """
    self: StageTask = on_job_error
    args = getattr(request, "args", None) or [{}]
    job = args[0] if isinstance(args[0], dict) else {}
    uuid, run_id = job.get("uuid"), job.get("run_id")
    if not uuid or not run_id:
        log.error("job_error_without_run", task=getattr(request, "task", None), error=repr(exc))
        return
    if is_transient(exc) and int(getattr(request, "retries", 0) or 0) < STAGE_RETRIES:
        # An outage, not a failed job: publishing the retry or the next link failed because SQS is unreachable,
        # so the acknowledgement fails too and SQS redelivers the stage after its visibility timeout.
        log.warning("stage_left_for_redelivery", job_uuid=uuid, stage=getattr(request, "task", None), error=repr(exc))
        return
    error = error_info(exc)
    log.error("job_failed", job_uuid=uuid, stage=getattr(request, "task", None), code=error.code, error=error.message)
    try:
        self.stores.assets.discard_work(uuid, run_id)
    except Exception as cleanup:  # the orphan sweep removes them later
        log.warning("work_cleanup_failed", job_uuid=uuid, error=repr(cleanup))
    # notify itself failed: the status says so; sending the callback is what failed
    fail_run(self.app, self.stores, uuid, run_id, error, callback=getattr(request, "task", None) != names.NOTIFY)


def fail_run(app: Celery, stores: Stores, uuid: str, run_id: str, error: ErrorInfo, *, callback: bool = True) -> bool:
    """End a run as failed — one conditional write — and queue its `failed` callback.

    False (and nothing sent) when the record belongs to another run or the run already ended: each run gets
    exactly one terminal callback, whichever of the errback, the watchdog or the dead-letter reaper gets here.
    """
    if not stores.jobs.advance(uuid, run_id, JobState.FAILED, error=error):
        log.info("run_already_ended_or_replaced", job_uuid=uuid, run_id=run_id, code=error.code)
        return False
    if callback:
        names.queue_failed_callback(app, uuid, run_id, error)
    return True


def hung_task_hook(app: Celery, settings: Settings) -> Callable[[RunningTask], None]:
    """The watchdog's hook (solo/threads pools): a stage stuck in a C call past its hard limit.

    The worker exits right after this (the stuck thread cannot be stopped), so: fail the run (`timeout`),
    queue its callback, then acknowledge its message — in that order, so an outage in between leaves the
    message to be retried rather than a job without a callback.
    """

    def fail_hung_task(task: RunningTask) -> None:
        job = task.job or {}
        uuid, run_id = job.get("uuid"), job.get("run_id")
        if not uuid or not run_id:
            return
        error = ErrorInfo(
            code="timeout", message=f"{task.name} passed its hard time limit stuck outside Python; the worker restarts"
        )
        fail_run(app, build_stores(settings), uuid, run_id, error, callback=task.name != names.NOTIFY)
        held = held_message(task.request)
        if held is not None:
            probe_client(settings).delete_message(QueueUrl=held[0], ReceiptHandle=held[1])

    return fail_hung_task
