"""POST /jobs, GET /jobs/{uuid} and DELETE /jobs/{uuid}: submit like the app server does, follow, cancel."""

from __future__ import annotations

from typing import Annotated

import structlog
from fastapi import APIRouter, HTTPException, Request
from fastapi import Path as PathParam
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError

from samseg.api.deps import QueuesDep, SettingsDep, StoresDep, authenticated
from samseg.core.contracts import UUID_PATTERN, JobAccepted, JobMessage, JobState, JobStatus, Segment
from samseg.core.options import check_server_limits, fingerprint
from samseg.stores.jobs import JobRecord
from samseg.stores.lifecycle import CancelOutcome, Lifecycle

log = structlog.get_logger(__name__)
router = APIRouter(tags=["jobs"])

JobIdParam = Annotated[str, PathParam(description="the job's uuid, as sent by the app server")]


@router.post("/jobs", status_code=202, response_model=JobAccepted, dependencies=[authenticated])
def submit_job(
    job: JobMessage, request: Request, stores: StoresDep, queues: QueuesDep, settings: SettingsDep
) -> JobAccepted:
    """Put a job on the jobs queue exactly as the app server would (a plain JSON message).

    422 names the field of a body this server would refuse (`options.points_per_side` above its limit too);
    409 when the uuid has an active run that asked for something else (another image_url/options/outputs).
    The same job again is accepted: a duplicate while it runs, the same callback again once it completed.
    """
    try:
        check_server_limits(job.options, settings)
    except ValidationError as exc:
        raise RequestValidationError([{**e, "loc": ("body", *e["loc"])} for e in exc.errors()]) from None
    try:
        current = stores.jobs.get(job.uuid)
    except Exception as exc:
        log.error("job_store_unavailable", error=repr(exc))
        raise HTTPException(503, detail="job status store unavailable; try again") from exc
    if conflicts(current, job):
        assert current is not None
        detail = f"job {job.uuid} is {current.status.value} with another image_url/options/outputs"
        raise HTTPException(409, detail=detail)
    try:
        message_id = queues.send_job(job.model_dump())
    except Exception as exc:
        log.error("submit_failed", job_uuid=job.uuid, error=repr(exc))
        raise HTTPException(503, detail="the jobs queue is unreachable; try again") from exc
    try:  # only if the job has no record: never resets a started job
        stores.jobs.create_queued(job.uuid, message_id=message_id, fingerprint=fingerprint(job))
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


@router.delete(
    "/jobs/{uuid}",
    status_code=202,
    response_model=JobStatus,
    response_model_exclude_none=True,
    dependencies=[authenticated],
)
def cancel_job(uuid: JobIdParam, stores: StoresDep, queues: QueuesDep, settings: SettingsDep) -> JobStatus:
    """Cancel a queued or running job (Lifecycle.cancel: one conditional write, so it races no other outcome).

    202 with the job's status: `canceled`, or still `running` with `cancel_requested` while a stage finishes
    its current step (a segmentation stops between decoder batches, within seconds). The app server gets one
    `canceled` callback. 409 (with its status) for a job that already ended; 404 for an unknown uuid.
    """
    if not UUID_PATTERN.fullmatch(uuid):
        raise HTTPException(404, detail="unknown job")
    try:
        outcome, record = Lifecycle(stores.jobs, settings).cancel(uuid)
    except Exception as exc:
        log.error("job_store_unavailable", error=repr(exc))
        raise HTTPException(503, detail="job status store unavailable; try again") from exc
    if outcome is CancelOutcome.UNKNOWN or record is None:
        raise HTTPException(404, detail="unknown job")
    if outcome is CancelOutcome.TERMINAL:
        raise HTTPException(409, detail={"message": f"job already {record.status.value}", "status": record.status})
    if outcome is CancelOutcome.CANCELED:
        try:  # the ingress queues the callback at once; without it the sweeper does, a minute later
            queues.send_job({"uuid": uuid, "action": "cancel"})
        except Exception as exc:
            log.warning("cancel_nudge_not_sent", job_uuid=uuid, error=repr(exc))
    return record.to_status()


def conflicts(current: JobRecord | None, job: JobMessage) -> bool:
    """The uuid has an active run that asked for something else (the re-send rules, docs/contract.md)."""
    if current is None or current.terminal or current.run_id is None or current.fingerprint is None:
        return False
    return current.fingerprint != fingerprint(job)


def _has_result(record: JobRecord) -> bool:
    """Published masks of this run: completed, or failed only because its callback was not accepted."""
    if record.assets_purged:
        return False
    return record.status is JobState.COMPLETED or (record.error is not None and record.error.code == "callback_failed")
