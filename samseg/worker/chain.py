"""The job's chain, built from task *names*: download → segment → persist → notify, with one errback.

Built by name (`app.signature("samseg.download", …)`), not from the task objects, so that whoever starts a
chain — the ingress, the sweeper, a CLI — needs only the Celery app, never the stage module (Celery's
"Breaking the chain"): the tasks import nothing that imports them back. Task names and task ids
(`{uuid}.{stage}`) are part of the wire format: messages in flight on SQS name them.
"""

from __future__ import annotations

from typing import Any

from celery import Celery, chain

from samseg.core.contracts import JobMessage, Stage

DOWNLOAD = "samseg.download"
SEGMENT = "samseg.segment"
PERSIST = "samseg.persist"
NOTIFY = "samseg.notify"
ON_JOB_ERROR = "samseg.on_job_error"
PURGE = "samseg.purge"
REAP_DEAD_TASKS = "samseg.reap_dead_tasks"
SWEEP = "samseg.sweep"
DELIVER_CALLBACK = "samseg.deliver_callback"
FAIL_RUN = "samseg.fail_run"
STAGES = (DOWNLOAD, SEGMENT, PERSIST, NOTIFY)
STAGE_TASKS = {Stage.DOWNLOAD: DOWNLOAD, Stage.SEGMENT: SEGMENT, Stage.PERSIST: PERSIST, Stage.NOTIFY: NOTIFY}


def task_id(uuid: str, task_name: str) -> str:
    """`{uuid}.{stage}`: the same id for every delivery of a stage, so logs and redeliveries line up."""
    return f"{uuid}.{task_name.removeprefix('samseg.')}"


def first_payload(job: JobMessage, deadline: float | None = None) -> dict[str, Any]:
    """The download stage's input, without the run id (the job store adds it when the run is claimed).

    The job's optional fields ride along only when set (`options` as sent, `outputs`, `events`, and the
    `deadline` computed from `ttl_seconds`), so a plain job's messages are exactly what they always were.
    """
    payload: dict[str, Any] = job.model_dump(include={"uuid", "image_url", "options", "outputs", "events"})
    if deadline is not None:
        payload["deadline"] = deadline
    return payload


def build_chain(app: Celery, job: JobMessage, run_id: str, deadline: float | None = None) -> Any:
    """The four stages of one run, each with a deterministic task id, and the errback that ends a failed run."""
    return chain_from(app, Stage.DOWNLOAD, {**first_payload(job, deadline), "run_id": run_id})


def chain_from(app: Celery, stage: Stage, payload: dict[str, Any]) -> Any:
    """The chain from `stage` on, its first link given `payload` (the sweeper republishes a lost stage so)."""
    uuid = str(payload["uuid"])
    first, *rest = STAGES[STAGES.index(STAGE_TASKS[stage]) :]
    links = [app.signature(first, args=(payload,), immutable=True).set(task_id=task_id(uuid, first))]
    links += [app.signature(name).set(task_id=task_id(uuid, name)) for name in rest]
    return chain(*links).on_error(app.signature(ON_JOB_ERROR))


def queue_delivery(app: Celery, uuid: str, run_id: str, countdown: float = 0) -> None:
    """Publish one attempt of the run's callback (samseg.worker.outbox); the outbox sends at most one at a time."""
    app.signature(DELIVER_CALLBACK, args=(uuid, run_id)).apply_async(
        task_id=f"{uuid}.callback", countdown=max(0.0, countdown) or None
    )
