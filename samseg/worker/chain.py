"""The job's chain, built from task *names*: download → segment → persist → notify, with one errback.

Built by name (`app.signature("samseg.download", …)`), not from the task objects, so that whoever starts a
chain — the ingress, the sweeper, a CLI — needs only the Celery app, never the stage module (Celery's
"Breaking the chain"): the tasks import nothing that imports them back. Task names and task ids
(`{uuid}.{stage}`) are part of the wire format: messages in flight on SQS name them.
"""

from __future__ import annotations

from typing import Any

from celery import Celery, chain

from samseg.core.contracts import ErrorInfo, JobMessage

DOWNLOAD = "samseg.download"
SEGMENT = "samseg.segment"
PERSIST = "samseg.persist"
NOTIFY = "samseg.notify"
ON_JOB_ERROR = "samseg.on_job_error"
PURGE = "samseg.purge"
REAP_DEAD_TASKS = "samseg.reap_dead_tasks"
STAGES = (DOWNLOAD, SEGMENT, PERSIST, NOTIFY)


def task_id(uuid: str, task_name: str) -> str:
    """`{uuid}.{stage}`: the same id for every delivery of a stage, so logs and redeliveries line up."""
    return f"{uuid}.{task_name.removeprefix('samseg.')}"


def build_chain(app: Celery, job: JobMessage, run_id: str) -> Any:
    """The four stages of one run, each with a deterministic task id, and the errback that ends a failed run."""
    payload = {"uuid": job.uuid, "image_url": job.image_url, "run_id": run_id}
    first, *rest = STAGES
    links = [app.signature(first, args=(payload,), immutable=True).set(task_id=task_id(job.uuid, first))]
    links += [app.signature(name).set(task_id=task_id(job.uuid, name)) for name in rest]
    return chain(*links).on_error(app.signature(ON_JOB_ERROR))


def queue_failed_callback(app: Celery, uuid: str, run_id: str, error: ErrorInfo) -> None:
    """Publish the `notify` of a failed run (its `failed` callback); the notify stage sends it at most once."""
    payload = {"uuid": uuid, "run_id": run_id, "error": error.model_dump()}
    app.signature(NOTIFY, args=(payload,)).apply_async(task_id=task_id(uuid, NOTIFY))
