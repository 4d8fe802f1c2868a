"""The job's chain: download → segment → persist → notify, and what happens when a link fails.

Tasks pass a small dict (`uuid`, `image_url`, image size, counts) — never pixels: SQS messages are capped
at 256 KiB, so images and masks travel through the work directory (a shared volume across hosts).
Any failure reaches `on_job_error`, which records it and queues a `failed` callback, so every job ends in
exactly one callback.
"""

from __future__ import annotations

import errno
import time
from pathlib import Path
from typing import Any

import numpy as np
import structlog
from billiard.exceptions import TimeLimitExceeded
from celery import Task, chain
from celery.exceptions import SoftTimeLimitExceeded

from samseg import metrics
from samseg.celery_app import app
from samseg.contracts import CallbackBody, CallbackStatus, ErrorInfo, JobMessage, JobState, Stage
from samseg.errors import JobError
from samseg.fetch import download_image, load_rgb, probe_image
from samseg.jobs import JobStore
from samseg.masks import pack_masks, unpack_masks
from samseg.notify import send_callback
from samseg.results import describe_segments, mask_url, write_job_folder
from samseg.segmenter import get_segmenter
from samseg.settings import get_settings
from samseg.storage import AssetStore

log = structlog.get_logger(__name__)

settings = get_settings()
store = AssetStore(settings.assets_dir)
jobs = JobStore(app)

SOURCE_FILE = "source"
MASKS_FILE = "masks.npz"
NOTIFY_TIME_LIMIT = int(
    settings.callback_max_attempts * (settings.callback_timeout_seconds + settings.callback_backoff_max_seconds) + 60
)


def build_chain(job: JobMessage, run_id: str) -> Any:
    """The four stages with deterministic task ids ({uuid}.{stage}) so logs and redeliveries line up."""
    payload = {"uuid": job.uuid, "image_url": job.image_url, "run_id": run_id}
    return chain(
        download.si(payload).set(task_id=f"{job.uuid}.download"),
        segment.s().set(task_id=f"{job.uuid}.segment"),
        persist.s().set(task_id=f"{job.uuid}.persist"),
        notify.s().set(task_id=f"{job.uuid}.notify"),
    ).on_error(on_job_error.s())


def enter_stage(job: dict[str, Any], stage: Stage) -> bool:
    """Record that `stage` runs; False for a message SQS delivered again after its run had finished.

    Such a replay is passed through untouched: run again, it would put a finished job back to `running` and
    fail on work files already cleaned up, sending a conflicting `failed` callback.
    """
    status = jobs.get(job["uuid"])
    run_id = job.get("run_id")
    if status and run_id and status.run_id == run_id and status.status in (JobState.COMPLETED, JobState.FAILED):
        log.info("stage_replay_skipped", run_id=run_id, status=status.status.value)
        return False
    jobs.set(job["uuid"], JobState.RUNNING, stage, run_id=run_id)
    return True


def _work_file(uuid: str, name: str) -> Path:
    path = store.work_dir(uuid) / name
    if not path.exists():
        raise JobError("work_missing", f"the job's work file {name} is gone (purged, or the volume is not shared)")
    return path


@app.task(name="samseg.download", bind=True, throws=(JobError,))
def download(self: Task, job: dict[str, Any]) -> dict[str, Any]:
    uuid = job["uuid"]
    if not enter_stage(job, Stage.DOWNLOAD):
        return job
    work = store.work_dir(uuid)
    work.mkdir(parents=True, exist_ok=True)
    size = download_image(job["image_url"], work / SOURCE_FILE, settings)
    info = probe_image(work / SOURCE_FILE, settings)
    log.info("image_downloaded", bytes=size, width=info.width, height=info.height, format=info.format)
    return {**job, "bytes": size}


@app.task(
    name="samseg.segment",
    bind=True,
    throws=(JobError,),
    time_limit=settings.segment_time_limit_seconds,
    # The soft limit leaves the task time to fail cleanly (status, callback) before the hard kill.
    soft_time_limit=max(0.8 * settings.segment_time_limit_seconds, settings.segment_time_limit_seconds - 30),
)
def segment(self: Task, job: dict[str, Any]) -> dict[str, Any]:
    uuid = job["uuid"]
    if not enter_stage(job, Stage.SEGMENT):
        return job
    work = store.work_dir(uuid)
    image = load_rgb(_work_file(uuid, SOURCE_FILE), settings)
    height, width = image.shape[:2]
    segmenter = get_segmenter(settings)
    try:
        result = segmenter.segment_with_fallback(image)
    except (SoftTimeLimitExceeded, JobError):
        raise
    except Exception as exc:  # CUDA OOM, shape errors…: the job fails with the reason, the worker lives
        raise JobError("model_error", f"mask generation failed: {type(exc).__name__}: {exc}") from exc
    tmp = work / f".{MASKS_FILE}.tmp.npz"
    np.savez(
        tmp,
        packed=pack_masks(result.masks),
        predicted_iou=result.predicted_iou,
        stability_score=result.stability_score,
    )
    tmp.replace(work / MASKS_FILE)
    log.info(
        "image_segmented",
        masks=len(result.masks),
        seconds=round(result.seconds, 2),
        width=width,
        height=height,
        points_per_side=settings.amg_points_per_side,
        device=segmenter.device,
    )
    return {**job, "width": width, "height": height, "mask_count": len(result.masks)}


@app.task(name="samseg.persist", bind=True, throws=(JobError,))
def persist(self: Task, job: dict[str, Any]) -> dict[str, Any]:
    uuid = job["uuid"]
    if not enter_stage(job, Stage.PERSIST):
        return job
    with np.load(_work_file(uuid, MASKS_FILE)) as data:
        masks = unpack_masks(data["packed"], job["width"])
        ious = data["predicted_iou"].tolist()
        stabilities = data["stability_score"].tolist()
    started = time.perf_counter()
    segments = describe_segments(masks, ious, stabilities, lambda i: mask_url(settings.public_base_url, uuid, i))
    body = CallbackBody(
        uuid=uuid, status="completed", segments=segments, image_width=job["width"], image_height=job["height"]
    )

    try:
        store.publish(uuid, lambda folder: write_job_folder(folder, masks, body))
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise JobError("disk_full", f"no space left in SAMSEG_ASSETS_DIR to write the masks: {exc}") from exc
        raise JobError("storage_error", f"cannot write the masks: {exc}") from exc
    store.discard_work(uuid)
    metrics.MASKS_PER_JOB.observe(len(segments))
    log.info("masks_persisted", masks=len(segments), seconds=round(time.perf_counter() - started, 3))
    return {**job, "mask_count": len(segments)}


@app.task(name="samseg.notify", bind=True, time_limit=NOTIFY_TIME_LIMIT, soft_time_limit=NOTIFY_TIME_LIMIT - 10)
def notify(self: Task, job: dict[str, Any]) -> dict[str, Any]:
    uuid = job["uuid"]
    run_id = job.get("run_id")
    error = ErrorInfo.model_validate(job["error"]) if job.get("error") else None
    current = jobs.get(uuid)
    if current and current.callback and current.callback.delivered and run_id and current.run_id == run_id:
        # A redelivered notify of a run whose callback already went out: don't send it twice.
        log.info("callback_already_delivered", run_id=run_id)
        return {"uuid": uuid, "status": current.status.value, "callback_delivered": True}
    if error is None:
        data = store.read_result(uuid)
        if data is None:
            error = ErrorInfo(code="result_missing", message="the job's result.json is gone (purged?)")
    if error is not None:
        body = CallbackBody(uuid=uuid, status="failed", segments=[], error=error)
    else:
        body = CallbackBody.model_validate(data)
    jobs.set(uuid, JobState.RUNNING, Stage.NOTIFY, segments=body.segments or None, error=error, run_id=run_id)
    delivery = send_callback(body, settings)
    if delivery.attempts:
        metrics.CALLBACKS.labels("delivered" if delivery.delivered else "failed").inc()
    callback = CallbackStatus(
        delivered=delivery.delivered, attempts=delivery.attempts, http_status=delivery.http_status, error=delivery.error
    )
    final_error = error
    if not delivery.delivered and delivery.attempts > 0 and final_error is None:
        final_error = ErrorInfo(code="callback_failed", message=f"the callback was not accepted: {delivery.error}")
    state = JobState.FAILED if final_error else JobState.COMPLETED
    metrics.JOBS.labels(state.value).inc()
    jobs.set(uuid, state, None, segments=body.segments or None, error=final_error, callback=callback, run_id=run_id)
    log.info("job_finished", status=state.value, callback_delivered=delivery.delivered)
    return {"uuid": uuid, "status": state.value, "callback_delivered": delivery.delivered}


@app.task(name="samseg.on_job_error")
def on_job_error(request: Any, exc: BaseException, traceback: Any) -> None:
    """Errback of every link: record the failure and queue the `failed` callback (once per job)."""
    args = getattr(request, "args", None) or [{}]
    job = args[0] if isinstance(args[0], dict) else {}
    uuid = job.get("uuid")
    if not uuid:
        log.error("job_error_without_uuid", task=getattr(request, "task", None), error=repr(exc))
        return
    error = error_info(exc)
    log.error("job_failed", job_uuid=uuid, stage=getattr(request, "task", None), code=error.code, error=error.message)
    store.discard_work(uuid)
    if getattr(request, "task", None) == notify.name:
        jobs.update(uuid, status=JobState.FAILED, stage=None, error=error)
        return
    run_id = job.get("run_id")
    jobs.set(uuid, JobState.FAILED, None, error=error, run_id=run_id)
    notify.apply_async(({"uuid": uuid, "run_id": run_id, "error": error.model_dump()},), task_id=f"{uuid}.notify")


def error_info(exc: BaseException) -> ErrorInfo:
    if isinstance(exc, JobError):
        return ErrorInfo(code=exc.code, message=exc.message)
    if isinstance(exc, SoftTimeLimitExceeded | TimeLimitExceeded):
        return ErrorInfo(code="timeout", message=f"the task ran past its time limit ({exc!r})")
    return ErrorInfo(code="internal_error", message=f"{type(exc).__name__}: {exc}")


@app.task(name="samseg.purge")
def purge() -> list[str]:
    removed = store.purge(
        settings.asset_ttl_seconds,
        work_max_age_seconds=settings.asset_ttl_seconds + settings.visibility_timeout_seconds,
        in_progress=jobs.in_progress,
    )
    log.info("assets_purged", removed=len(removed), ttl_seconds=settings.asset_ttl_seconds)
    return removed
