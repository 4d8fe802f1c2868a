"""HTTP API: job submission and status, the mask assets, health.

Assets are served by an explicit route rather than a static mount: only `{uuid}/mask_images/mask_NNN.png`
and `{uuid}/result.json` exist as URLs, so nothing else under the assets directory (work files, the job
database, a symlink) can ever be reached.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated

import structlog
from fastapi import FastAPI, HTTPException, Request
from fastapi import Path as PathParam
from fastapi.responses import FileResponse, JSONResponse, Response

from samseg import metrics  # first: it configures prometheus_client's multiprocess mode
from samseg.celery_app import app as celery_app
from samseg.contracts import UUID_PATTERN, JobAccepted, JobMessage, JobState, JobStatus
from samseg.health import readiness
from samseg.jobs import JobStore
from samseg.logs import configure_logging
from samseg.settings import get_settings
from samseg.sqs import JobQueues, probe_client
from samseg.storage import MASK_DIR, RESULT_FILE, AssetStore

log = structlog.get_logger(__name__)
settings = get_settings()
configure_logging(settings.log_level, settings.log_json)

MASK_NAME = re.compile(r"^mask_\d{3,6}\.png$")

app = FastAPI(
    title="samseg",
    version="0.1.0",
    summary="SAM-2 automatic masks: job status and mask assets",
)
store = AssetStore(settings.assets_dir)
jobs = JobStore(celery_app)
_queues: JobQueues | None = None

JobIdParam = Annotated[str, PathParam(description="the job's uuid, as sent by the app server")]


def job_queues() -> JobQueues:
    global _queues
    if _queues is None:
        _queues = JobQueues(settings)
    return _queues


@app.get("/healthz", tags=["health"])
def healthz() -> dict[str, str]:
    """The process is up and serving (no dependency checks)."""
    return {"status": "ok"}


@app.get("/readyz", tags=["health"])
def readyz() -> JSONResponse:
    """Ready to take jobs: SQS reachable, assets volume writable, enough free disk. 503 lists what is not."""

    ok, checks = readiness(settings, lambda: _probe_queues().reachable(settings.jobs_queue))
    return JSONResponse({"status": "ready" if ok else "not ready", "checks": checks}, status_code=200 if ok else 503)


_probe: JobQueues | None = None


def _probe_queues() -> JobQueues:
    """Readiness has its own fail-fast client (one attempt, short timeouts) and asks SQS on every probe."""
    global _probe
    if _probe is None:
        _probe = JobQueues(settings, client=probe_client(settings))
    return _probe


@app.get("/metrics", tags=["health"], response_class=Response)
def prometheus_metrics() -> Response:
    """Prometheus text format: this API process's samples, queue depth, free disk (workers serve their own)."""
    _queue_depth.ensure_started()
    return Response(metrics.render(_queue_depth, _disk), media_type="text/plain; version=0.0.4; charset=utf-8")


def _queue_depths() -> dict[str, int]:
    queues = _probe_queues()
    names = (settings.jobs_queue, settings.dead_letter_queue, settings.io_queue, settings.gpu_queue)
    return {name: queues.depth(name) for name in (*names, *settings.task_dead_letter_queues.values())}


# Read by a background thread (started by the first scrape), never on the scrape's own thread.
_queue_depth = metrics.QueueDepthPoller(_queue_depths, settings.queue_depth_interval_seconds)
_disk = metrics.DiskCollector(settings.assets_dir)


@app.post("/jobs", status_code=202, response_model=JobAccepted, tags=["jobs"])
def submit_job(job: JobMessage, request: Request) -> JobAccepted:
    """Put a job on the jobs queue exactly as the app server would (a plain JSON message)."""
    try:
        job_queues().send_job(job.model_dump())
    except Exception as exc:
        log.error("submit_failed", job_uuid=job.uuid, error=repr(exc))
        raise HTTPException(503, detail="the jobs queue is unreachable; try again") from exc
    if jobs.get(job.uuid) is None:
        jobs.set(job.uuid, JobState.QUEUED)
    return JobAccepted(uuid=job.uuid, status_url=str(request.url_for("job_status", uuid=job.uuid)))


@app.get("/jobs/{uuid}", response_model=JobStatus, response_model_exclude_none=True, tags=["jobs"])
def job_status(uuid: JobIdParam) -> JobStatus:
    """queued → running (with the current stage) → completed (with segments) or failed (with the error)."""
    if not UUID_PATTERN.fullmatch(uuid):
        raise HTTPException(404, detail="unknown job")
    try:
        status = jobs.get(uuid)
    except Exception as exc:
        log.error("job_store_unavailable", error=repr(exc))
        raise HTTPException(503, detail="job status store unavailable; try again") from exc
    if status is None:
        raise HTTPException(404, detail="unknown job")
    return status


@app.get("/assets/{uuid}/mask_images/{name}", tags=["assets"], response_class=FileResponse)
def mask_image(uuid: JobIdParam, name: str) -> FileResponse:
    if not UUID_PATTERN.fullmatch(uuid) or not MASK_NAME.fullmatch(name):
        raise HTTPException(404, detail="not found")
    return _serve(store.job_dir(uuid) / MASK_DIR / name, "image/png")


@app.get("/assets/{uuid}/result.json", tags=["assets"], response_class=FileResponse)
def result_json(uuid: JobIdParam) -> FileResponse:
    if not UUID_PATTERN.fullmatch(uuid):
        raise HTTPException(404, detail="not found")
    return _serve(store.job_dir(uuid) / RESULT_FILE, "application/json")


def _serve(path: Path, media_type: str) -> FileResponse:
    root = store.root.resolve()
    # Names were validated above; refusing links as well keeps a planted symlink from leaking files.
    if path.is_symlink() or path.parent.is_symlink() or path.parent.parent.is_symlink() or not path.is_file():
        raise HTTPException(404, detail="not found")
    if root not in path.resolve().parents:
        raise HTTPException(404, detail="not found")
    return FileResponse(path, media_type=media_type, headers={"Cache-Control": "public, max-age=300"})
