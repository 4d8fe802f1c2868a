"""The four stages of a job's chain: download → segment → persist → notify (samseg.worker.chain builds it).

Every status write names its run and is conditional (samseg.stores.jobs): a stage whose write is refused
belongs to a run that was replaced or has moved past it (a redelivered message), and stops its chain there.
Any failure reaches `samseg.worker.failure.on_job_error`, which records it and queues the `failed` callback,
so every run ends in exactly one callback.

Time limits are not fixed here: they come from Settings through `task_annotations` (samseg.worker.config), so
importing this module reads no configuration.
"""

from __future__ import annotations

import json
import time
from typing import Any

import structlog
from celery import shared_task
from celery.exceptions import SoftTimeLimitExceeded

from samseg.core.contracts import CallbackBody, CallbackStatus, ErrorInfo, JobState, Stage
from samseg.core.errors import JobError, is_transient
from samseg.core.masks import PackedMasks, write_packed_masks
from samseg.ops import metrics
from samseg.runtime.segmenter import get_segmenter
from samseg.stores.layout import work_key
from samseg.stores.results import describe_segments, mask_path
from samseg.stores.signed_urls import signed_mask_url
from samseg.transfer.callbacks import send_callback, webhook_id_for
from samseg.transfer.image_fetch import download_image, load_rgb, probe_image
from samseg.worker import chain as names
from samseg.worker.base import STAGE_RETRIES, StageTask, storage_errors

log = structlog.get_logger(__name__)

SOURCE_FILE = "source"
MASKS_FILE = "masks.npy"
SCORES_FILE = "scores.json"


@shared_task(name=names.DOWNLOAD, bind=True, base=StageTask, throws=(JobError,))
def download(self: StageTask, job: dict[str, Any]) -> dict[str, Any]:
    if not self.enter(job, Stage.DOWNLOAD):
        return job
    with self.scratch() as tmp, storage_errors():
        size = download_image(job["image_url"], tmp / SOURCE_FILE, self.settings)
        info = probe_image(tmp / SOURCE_FILE, self.settings)
        self.stores.blobs.put_file(work_key(job["uuid"], job["run_id"], SOURCE_FILE), tmp / SOURCE_FILE)
    log.info("image_downloaded", bytes=size, width=info.width, height=info.height, format=info.format)
    return {**job, "bytes": size}


@shared_task(name=names.SEGMENT, bind=True, base=StageTask, throws=(JobError,))
def segment(self: StageTask, job: dict[str, Any]) -> dict[str, Any]:
    if not self.enter(job, Stage.SEGMENT):
        return job
    settings = self.settings
    with self.scratch() as tmp:
        with storage_errors():
            source = self.fetch_work(job, SOURCE_FILE, tmp / SOURCE_FILE)
        image = load_rgb(source, settings)
        height, width = image.shape[:2]
        segmenter = get_segmenter(settings)
        try:
            result = segmenter.segment_with_fallback(image)
        except (SoftTimeLimitExceeded, JobError):
            raise
        except Exception as exc:  # CUDA OOM, shape errors…: the job fails with the reason, the worker lives
            raise JobError("model_error", f"mask generation failed: {type(exc).__name__}: {exc}") from exc
        del image
        count = len(result.masks)
        write_packed_masks(tmp / MASKS_FILE, result.masks, count, height, width)
        result.masks.clear()  # the generator's full-resolution masks are not needed past this point
        scores = {"predicted_iou": result.predicted_iou.tolist(), "stability_score": result.stability_score.tolist()}
        with storage_errors():
            self.stores.blobs.put_file(work_key(job["uuid"], job["run_id"], MASKS_FILE), tmp / MASKS_FILE)
            self.stores.blobs.put(work_key(job["uuid"], job["run_id"], SCORES_FILE), json.dumps(scores).encode())
    log.info(
        "image_segmented",
        masks=count,
        seconds=round(result.seconds, 2),
        width=width,
        height=height,
        points_per_side=settings.amg_points_per_side,
        device=segmenter.device,
    )
    return {**job, "width": width, "height": height, "mask_count": count}


@shared_task(name=names.PERSIST, bind=True, base=StageTask, throws=(JobError,))
def persist(self: StageTask, job: dict[str, Any]) -> dict[str, Any]:
    if not self.enter(job, Stage.PERSIST):
        return job
    uuid, settings = job["uuid"], self.settings
    started = time.perf_counter()
    now = time.time()  # one expiry for every signed mask URL of the job
    with self.scratch() as tmp, storage_errors():
        masks = PackedMasks(self.fetch_work(job, MASKS_FILE, tmp / MASKS_FILE), job["width"])
        scores = json.loads(self.fetch_work(job, SCORES_FILE, tmp / SCORES_FILE).read_text())
        segments = describe_segments(
            masks,
            scores["predicted_iou"],
            scores["stability_score"],
            lambda i: signed_mask_url(settings.public_base_url, mask_path(uuid, i), settings, now),
        )
        body = CallbackBody(
            uuid=uuid, status="completed", segments=segments, image_width=job["width"], image_height=job["height"]
        )
        self.stores.assets.publish(uuid, masks, body)
        self.stores.assets.discard_work(uuid, job["run_id"])
    metrics.instruments().masks_per_job.observe(len(segments))
    log.info("masks_persisted", masks=len(segments), seconds=round(time.perf_counter() - started, 3))
    return {**job, "mask_count": len(segments)}


@shared_task(name=names.NOTIFY, bind=True, base=StageTask)
def notify(self: StageTask, job: dict[str, Any]) -> dict[str, Any]:
    """Send the run's one terminal callback; `job["error"]` set means the run failed (from on_job_error)."""
    uuid, run_id = job["uuid"], job["run_id"]
    if job.get("outcome") is None:
        outcome = _send_callback_once(self, job)
        if outcome is None:
            return {"uuid": uuid, "status": "skipped"}
        job = {**job, "outcome": outcome}
    outcome = job["outcome"]
    state = JobState(outcome["status"])
    try:
        written = self.stores.jobs.advance(
            uuid,
            run_id,
            state,
            error=ErrorInfo.model_validate(outcome["error"]) if outcome.get("error") else None,
            callback=CallbackStatus.model_validate(outcome["callback"]),
        )
    except Exception as exc:
        if not is_transient(exc):
            raise
        # The callback went out; only its record is missing. Retry the write alone, never the send.
        delay = min(300, 5 * 2 ** int(self.request.retries or 0))
        log.warning("callback_outcome_write_retry", error=repr(exc)[:300], retry_in_seconds=delay)
        raise self.retry(args=[job], exc=exc, countdown=delay, max_retries=STAGE_RETRIES) from exc
    if not written:
        log.warning("job_status_write_refused", run_id=run_id, status=state.value)
    log.info("job_finished", status=state.value, callback_delivered=outcome["callback"]["delivered"])
    return {"uuid": uuid, "status": state.value, "callback_delivered": outcome["callback"]["delivered"]}


def _send_callback_once(task: StageTask, job: dict[str, Any]) -> dict[str, Any] | None:
    """The callback of this run, unless the run is stale or its callback already went out; its outcome."""
    uuid, run_id = job["uuid"], job["run_id"]
    error = ErrorInfo.model_validate(job["error"]) if job.get("error") else None
    record = task.stores.jobs.get(uuid)
    if record is None or record.run_id != run_id:
        log.info("callback_skipped_stale_run", run_id=run_id, current_run=record.run_id if record else None)
        return None
    if record.callback and record.callback.delivered:
        # A redelivered notify of a run whose callback already went out: don't send it twice.
        log.info("callback_already_delivered", run_id=run_id)
        return None
    if error is None:
        if not task.enter(job, Stage.NOTIFY):
            return None
        data = task.stores.assets.read_result(uuid)
        if data is None:
            error = ErrorInfo(code="result_missing", message="the job's result.json is gone (purged?)")
    body = (
        CallbackBody(uuid=uuid, status="failed", segments=[], error=error)
        if error is not None
        else CallbackBody.model_validate(data)
    )
    # One webhook-id per run: the app server's dedupe key for retries of this callback.
    delivery = send_callback(body, task.settings, webhook_id=webhook_id_for(uuid, run_id))
    if delivery.attempts:
        metrics.instruments().callbacks.labels("delivered" if delivery.delivered else "failed").inc()
    callback = CallbackStatus(
        delivered=delivery.delivered, attempts=delivery.attempts, http_status=delivery.http_status, error=delivery.error
    )
    if not delivery.delivered and delivery.attempts > 0 and error is None:
        error = ErrorInfo(code="callback_failed", message=f"the callback was not accepted: {delivery.error}")
    state = JobState.FAILED if error else JobState.COMPLETED
    metrics.instruments().jobs.labels(state.value).inc()
    return {"status": state.value, "error": error.model_dump() if error else None, "callback": callback.model_dump()}
