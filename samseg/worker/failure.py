"""How a run ends when it fails: the errback of every link, the durable `fail_run` task, and the watchdog's
hard-timeout hook.

Every path that fails a run goes through `samseg.stores.lifecycle.Lifecycle.fail`, one conditional write that
ends the run *and* opens its callback outbox: only the copy of the stage that holds the run's lease may fail
it (the errback and the watchdog pass the failing task's lease token), so a duplicate copy that lost the
run never fails a run that succeeded. Failing is as durable as succeeding: if the store is unreachable when
the errback runs (Celery calls errbacks synchronously and swallows their exceptions), the failure is handed
to the `samseg.fail_run` task, which retries through the outage like any stage; and if even that publish
fails, the stage's lease runs out and the sweeper republishes the stage, which fails again.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import structlog
from celery import Celery, shared_task

from samseg.core.contracts import ErrorInfo, Stage
from samseg.core.errors import is_transient
from samseg.core.settings import Settings
from samseg.ops.watchdog import RunningTask, held_message
from samseg.queue.sqs import probe_client
from samseg.stores import build_stores
from samseg.stores.layout import Assets
from samseg.stores.lifecycle import Lifecycle
from samseg.worker import chain as names
from samseg.worker.base import STAGE_RETRIES, StageTask, error_info
from samseg.worker.leases import LeaseKeeper

log = structlog.get_logger(__name__)

TASK_STAGES = {name: stage for stage, name in names.STAGE_TASKS.items()}


@shared_task(name=names.ON_JOB_ERROR, base=StageTask)
def on_job_error(request: Any, exc: BaseException, traceback: Any) -> None:
    """Errback of every link: fail the run (as the lease's holder) and queue its `failed` callback.

    Not `bind=True`: Celery passes (request, exc, traceback) only to errbacks whose signature has exactly
    those three parameters; the task instance (its stores, its app) is reached through its own name instead.
    """
    self: StageTask = on_job_error
    args = getattr(request, "args", None) or [{}]
    job = args[0] if isinstance(args[0], dict) else {}
    uuid, run_id = job.get("uuid"), job.get("run_id")
    task_name = getattr(request, "task", None)
    if not uuid or not run_id:
        log.error("job_error_without_run", task=task_name, error=repr(exc))
        return
    lease = self.leases.take_failed(getattr(request, "id", None) or "")
    if is_transient(exc) and int(getattr(request, "retries", 0) or 0) < STAGE_RETRIES:
        # An outage, not a failed job: publishing the retry or the next link failed because SQS is unreachable,
        # so the acknowledgement fails too and SQS redelivers the stage after its visibility timeout.
        log.warning("stage_left_for_redelivery", job_uuid=uuid, stage=task_name, error=repr(exc))
        return
    error = error_info(exc)
    log.error("job_failed", job_uuid=uuid, stage=task_name, code=error.code, error=error.message)
    failure = {
        "uuid": uuid,
        "run_id": run_id,
        "error": error.model_dump(),
        "token": lease.token if lease is not None and lease.run_id == run_id else None,
        "stage": TASK_STAGES[task_name].value if task_name in TASK_STAGES else None,
    }
    # Without the token (not found in this process), fail only a stage whose holder is gone.
    failure["lease_expired"] = failure["token"] is None
    try:
        end_failed_run(self.app, self.lifecycle, failure, self.stores.assets)
    except Exception as failed:  # the store or SQS is unreachable: the fail_run task retries through it
        log.warning("job_failure_deferred", job_uuid=uuid, error=repr(failed)[:300])
        self.app.signature(names.FAIL_RUN, args=(failure,)).apply_async(task_id=f"{uuid}.fail")


@shared_task(name=names.FAIL_RUN, bind=True, base=StageTask)
def fail_run(self: StageTask, failure: dict[str, Any]) -> bool:
    """Record a failure the errback could not (an outage); retried through outages by StageTask."""
    return end_failed_run(self.app, self.lifecycle, failure, self.stores.assets)


def end_failed_run(app: Celery, lifecycle: Lifecycle, failure: dict[str, Any], assets: Assets | None = None) -> bool:
    """Fail the run as `failure` says (conditional: see Lifecycle.fail), then queue its callback attempt and drop
    the run's work files (only the copy that failed the run does; the purge's orphan sweep is the backstop)."""
    uuid, run_id = str(failure["uuid"]), str(failure["run_id"])
    stage = Stage(failure["stage"]) if failure.get("stage") else None
    token = failure.get("token")
    ended = lifecycle.fail(
        uuid,
        run_id,
        ErrorInfo.model_validate(failure["error"]),
        token=token,
        stage=None if token else stage,
        lease_expired=bool(failure.get("lease_expired", False)),
    )
    if ended:
        names.queue_delivery(app, uuid, run_id)
        if assets is not None:
            try:
                assets.discard_work(uuid, run_id)
            except Exception as cleanup:
                log.warning("work_cleanup_failed", job_uuid=uuid, error=repr(cleanup))
    else:
        log.info("run_already_ended_or_held_elsewhere", job_uuid=uuid, run_id=run_id, code=failure["error"]["code"])
    return ended


def hung_task_hook(app: Celery, settings: Settings) -> Callable[[RunningTask], None]:
    """The watchdog's hook (solo/threads pools): a stage stuck in a C call past its hard limit.

    The worker exits right after this (the stuck thread cannot be stopped), so: fail the run (`timeout`, as
    the holder of its lease), queue its callback, then acknowledge its message — in that order, so an outage
    in between leaves the message to be retried rather than a job without a callback.
    """

    def fail_hung_task(task: RunningTask) -> None:
        job = task.job or {}
        uuid, run_id = job.get("uuid"), job.get("run_id")
        if not uuid or not run_id:
            return
        error = ErrorInfo(
            code="timeout", message=f"{task.name} passed its hard time limit stuck outside Python; the worker restarts"
        )
        stores = build_stores(settings)
        lifecycle = Lifecycle(stores.jobs, settings)
        lease = LeaseKeeper.for_process(lifecycle).take_failed(task.task_id)
        failure = {
            "uuid": uuid,
            "run_id": run_id,
            "error": error.model_dump(),
            "token": lease.token if lease is not None else None,
            "stage": TASK_STAGES[task.name].value if task.name in TASK_STAGES else None,
            "lease_expired": False,
        }
        end_failed_run(app, lifecycle, failure, stores.assets)
        held = held_message(task.request)
        if held is not None:
            probe_client(settings).delete_message(QueueUrl=held[0], ReceiptHandle=held[1])

    return fail_hung_task
