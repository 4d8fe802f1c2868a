"""POST /jobs and GET /jobs/{uuid}: submit like the app server does, and follow a job's status."""

from __future__ import annotations

from typing import Annotated

import structlog
from fastapi import APIRouter, HTTPException, Request
from fastapi import Path as PathParam

from samseg.api.deps import QueuesDep, StoresDep, authenticated
from samseg.core.contracts import UUID_PATTERN, JobAccepted, JobMessage, JobState, JobStatus, Segment
from samseg.core.options import not_yet_honoured
from samseg.stores.jobs import JobRecord

log = structlog.get_logger(__name__)
router = APIRouter(tags=["jobs"])

JobIdParam = Annotated[str, PathParam(description="the job's uuid, as sent by the app server")]


@router.post("/jobs", status_code=202, response_model=JobAccepted, dependencies=[authenticated])
def submit_job(job: JobMessage, request: Request, stores: StoresDep, queues: QueuesDep) -> JobAccepted:
    """Put a job on the jobs queue exactly as the app server would (a plain JSON message)."""
    unsupported = not_yet_honoured(job)
    if unsupported:
        raise HTTPException(422, detail=f"not supported by this samseg version yet: {', '.join(unsupported)}")
    try:
        queues.send_job(job.model_dump())
    except Exception as exc:
        log.error("submit_failed", job_uuid=job.uuid, error=repr(exc))
        raise HTTPException(503, detail="the jobs queue is unreachable; try again") from exc
    try:
        stores.jobs.create_queued(job.uuid)  # only if the job has no record: never resets a started job
    except Exception as exc:  # the message is on its way; the ingress writes the record when it takes it
        log.warning("job_placeholder_not_written", job_uuid=job.uuid, error=repr(exc))
    return JobAccepted(uuid=job.uuid, status_url=str(request.url_for("job_status", uuid=job.uuid)))


@router.get("/jobs/{uuid}", response_model=JobStatus, response_model_exclude_none=True, dependencies=[authenticated])
def job_status(uuid: JobIdParam, stores: StoresDep) -> JobStatus:
    """queued → running (with the current stage) → completed (with segments) or failed (with the error)."""
    if not UUID_PATTERN.fullmatch(uuid):
        raise HTTPException(404, detail="unknown job")
    try:
        record = stores.jobs.get(uuid)
        result = stores.assets.read_result(uuid) if record and _has_result(record) else None
    except Exception as exc:
        log.error("job_store_unavailable", error=repr(exc))
        raise HTTPException(503, detail="job status store unavailable; try again") from exc
    if record is None:
        raise HTTPException(404, detail="unknown job")
    status = record.to_status()
    if result is not None:  # segments live with the assets, so they disappear with them at the purge
        status.segments = [Segment.model_validate(s) for s in result.get("segments", [])]
    return status


def _has_result(record: JobRecord) -> bool:
    """Published masks of this run: completed, or failed only because its callback was not accepted."""
    if record.assets_purged:
        return False
    return record.status is JobState.COMPLETED or (record.error is not None and record.error.code == "callback_failed")
