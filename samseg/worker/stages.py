"""The four stages of a job's chain: download → segment → persist → notify (samseg.worker.chain builds it).

Each stage first takes its run's lease (`StageTask.hold`, samseg.stores.lifecycle) and, once done, hands the
run to the next stage (`StageTask.hand_off`) before Celery publishes it: a copy of a stage that does not hold
the run — a duplicate delivery, a run that moved on or was replaced — ends quietly and publishes nothing. Any
failure reaches `samseg.worker.failure.on_job_error`, which fails the run (only the lease's holder can) and
queues its `failed` callback; `notify` completes the run and queues its callback: one outcome per run.

Time limits are not fixed here: they come from Settings through `task_annotations` (samseg.worker.config), so
importing this module reads no configuration.
"""

from __future__ import annotations

import json
import time
from typing import Any

import structlog
from celery import shared_task
from celery.exceptions import Ignore, SoftTimeLimitExceeded
from PIL import Image

from samseg.core.contracts import (
    CallbackBody,
    EffectiveOptions,
    ErrorInfo,
    JobOptions,
    JobState,
    ModelInfo,
    OutputKind,
    ResultDocument,
    Stage,
)
from samseg.core.errors import JobCanceled, JobError
from samseg.core.masks import PackedMasks
from samseg.core.options import resolve_options
from samseg.core.outputs import LABEL_MAP_FILE, OVERLAY_FILE
from samseg.core.settings import Settings
from samseg.core.version import samseg_version
from samseg.ops import metrics
from samseg.runtime.segmenter import get_segmenter
from samseg.runtime.weights import checkpoint_sha256
from samseg.stores.layout import work_key
from samseg.stores.lifecycle import Step
from samseg.stores.outputs import asset_path, result_segments, write_job_outputs
from samseg.stores.results import RESULT_FILE, describe_segments, mask_path
from samseg.stores.signed_urls import signed_mask_url
from samseg.transfer.callbacks import attempt_callback, event_webhook_id
from samseg.transfer.image_fetch import download_image, load_rgb, probe_image
from samseg.worker import chain as names
from samseg.worker.base import StageTask, storage_errors

log = structlog.get_logger(__name__)

SOURCE_FILE = "source"
MASKS_FILE = "masks.npy"
SCORES_FILE = "scores.json"
JOB_OUTPUT_FILES: dict[OutputKind, str] = {"label_map": LABEL_MAP_FILE, "overlay": OVERLAY_FILE}


@shared_task(name=names.DOWNLOAD, bind=True, base=StageTask, throws=(JobError,))
def download(self: StageTask, job: dict[str, Any]) -> dict[str, Any]:
    lease = self.hold(job, Stage.DOWNLOAD)
    with self.scratch() as tmp, storage_errors():
        size = download_image(job["image_url"], tmp / SOURCE_FILE, self.settings)
        info = probe_image(tmp / SOURCE_FILE, self.settings)
        self.stores.blobs.put_file(work_key(job["uuid"], job["run_id"], SOURCE_FILE), tmp / SOURCE_FILE)
    log.info("image_downloaded", bytes=size, width=info.width, height=info.height, format=info.format)
    return self.hand_off(lease, {**job, "bytes": size})


def job_params(job: dict[str, Any], settings: Settings) -> EffectiveOptions:
    """The options this run uses: the job's own (validated at the ingress), else the server's."""
    options = JobOptions.model_validate(job["options"]) if job.get("options") else None
    return resolve_options(options, settings)


def send_running_event(job: dict[str, Any], settings: Settings) -> None:
    """The `running` progress event (`events: ["running"]`): one signed PATCH, its own webhook-id, best effort.

    Sent while this stage holds the run's lease: a cancel meanwhile only marks the run, and the terminal callback
    is queued only when the holder (this task, after this call returns) or a takeover ends the run, so the event
    never follows the terminal callback. One attempt, not retried: a progress hint, not an outcome; a segment
    retried after an outage may send it again with the same webhook-id (the receiver's dedupe key).
    """
    uuid, run_id = job["uuid"], job["run_id"]
    body = CallbackBody(uuid=uuid, status="running")
    attempt = attempt_callback(body, settings, webhook_id=event_webhook_id(uuid, run_id, "running"))
    log.info("running_event", delivered=attempt.delivered, http_status=attempt.http_status, error=attempt.error)


@shared_task(name=names.SEGMENT, bind=True, base=StageTask, throws=(JobError,))
def segment(self: StageTask, job: dict[str, Any]) -> dict[str, Any]:
    lease = self.hold(job, Stage.SEGMENT)
    settings = self.settings
    params = job_params(job, settings)
    if "running" in (job.get("events") or []) and self.request.retries == 0:
        send_running_event(job, settings)
    with self.scratch() as tmp:
        with storage_errors():
            source = self.fetch_work(job, SOURCE_FILE, tmp / SOURCE_FILE)
        image = load_rgb(source, settings)
        height, width = image.shape[:2]
        segmenter = get_segmenter(settings)
        try:
            # Each mask is bit-packed into the work file as it is produced: peak memory stays one full-resolution
            # mask above the model, not every mask (~4 GB at 40 MP x 100 masks).
            result = segmenter.segment_packed_with_fallback(
                image, tmp / MASKS_FILE, options=params, should_stop=self.cancel_check(lease)
            )
        except JobCanceled:
            self.end_here(lease, self.lifecycle.end_canceled(lease.uuid, lease.run_id, lease.token))
        except (SoftTimeLimitExceeded, JobError):
            raise
        except Exception as exc:  # CUDA OOM, shape errors…: the job fails with the reason, the worker lives
            raise JobError("model_error", f"mask generation failed: {type(exc).__name__}: {exc}") from exc
        del image
        count = result.count
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
        points_per_side=params.points_per_side,
        device=segmenter.device,
    )
    # What produced the masks, recorded where the model is: persist runs on io workers, which have no weights.
    model = ModelInfo(config=settings.sam2_model, checkpoint_sha256=checkpoint_sha256(settings.checkpoint_path))
    return self.hand_off(
        lease, {**job, "width": width, "height": height, "mask_count": count, "model": model.model_dump()}
    )


@shared_task(name=names.PERSIST, bind=True, base=StageTask, throws=(JobError,))
def persist(self: StageTask, job: dict[str, Any]) -> dict[str, Any]:
    """Publish the run's result: mask PNGs, the outputs it asked for, then result.json (the callback's body).

    result.json is a ResultDocument: the callback's fields (signed URLs fixed here, so every attempt sends
    the same body), each segment's `rle`/`polygons` when asked, `params`, `outputs`, `model`, `samseg_version`.
    """
    lease = self.hold(job, Stage.PERSIST)
    uuid, settings = job["uuid"], self.settings
    params = job_params(job, settings)
    outputs: list[OutputKind] = list(job.get("outputs") or [])
    started = time.perf_counter()
    now = time.time()  # one expiry for every signed URL of the job

    def url(path: str) -> str:
        return signed_mask_url(settings.public_base_url, path, settings, now)

    with self.scratch() as tmp, storage_errors():
        masks = PackedMasks(self.fetch_work(job, MASKS_FILE, tmp / MASKS_FILE), job["width"])
        scores = json.loads(self.fetch_work(job, SCORES_FILE, tmp / SCORES_FILE).read_text())
        segments = describe_segments(
            masks, scores["predicted_iou"], scores["stability_score"], lambda i: url(mask_path(uuid, i))
        )
        source = self.fetch_work(job, SOURCE_FILE, tmp / SOURCE_FILE) if "overlay" in outputs else None
        document = ResultDocument(
            uuid=uuid,
            status="completed",
            segments=result_segments(masks, segments, outputs, params, settings.polygon_max_vertices),
            image_width=job["width"],
            image_height=job["height"],
            result_url=url(asset_path(uuid, RESULT_FILE)),
            label_map_url=url(asset_path(uuid, LABEL_MAP_FILE)) if "label_map" in outputs else None,
            overlay_url=url(asset_path(uuid, OVERLAY_FILE)) if "overlay" in outputs else None,
            params=params,
            outputs=outputs,
            model=ModelInfo.model_validate(job["model"]) if job.get("model") else None,
            samseg_version=samseg_version(),
        )

        def write_outputs() -> None:
            def image() -> Image.Image:
                assert source is not None
                return Image.fromarray(load_rgb(source, settings))

            areas = [s.area for s in segments]
            write_job_outputs(self.stores.blobs, uuid, masks, areas, outputs, image if source else None)

        written = tuple(name for kind, name in JOB_OUTPUT_FILES.items() if kind in outputs)
        self.stores.assets.publish(uuid, masks, document, write_outputs, written)
    metrics.instruments().masks_per_job.observe(len(segments))
    log.info("masks_persisted", masks=len(segments), seconds=round(time.perf_counter() - started, 3))
    # The run's work files stay: they are this stage's input until its hand-off is recorded (notify removes them).
    return self.hand_off(lease, {**job, "mask_count": len(segments)})


@shared_task(name=names.NOTIFY, bind=True, base=StageTask)
def notify(self: StageTask, job: dict[str, Any]) -> dict[str, Any]:
    """End the run: `completed` with its callback queued in the outbox, in one write (samseg.stores.lifecycle).

    The callback body is result.json, written once by persist (signed mask URLs included), so every attempt
    sends the same body. A `notify` carrying `error` was published by an earlier samseg's failure path: its
    run is already failed; its callback goes through the outbox now.
    """
    uuid, run_id = job["uuid"], job["run_id"]
    if job.get("error") is not None:
        if self.lifecycle.adopt_failed(uuid, run_id):
            names.queue_delivery(self.app, uuid, run_id)
        return {"uuid": uuid, "status": JobState.FAILED.value}
    lease = self.hold(job, Stage.NOTIFY)
    self.discard_work(uuid, run_id, raise_outage=True)  # a completed run leaves no work file behind
    if not self.stores.assets.is_published(uuid):
        error = ErrorInfo(code="result_missing", message="the job's result.json is gone (purged?)")
        if not self.lifecycle.fail(uuid, run_id, error, token=lease.token, result_missing=True):
            raise Ignore()  # another copy took the run over meanwhile: it ends it
        state = JobState.FAILED
    else:
        step = self.lifecycle.complete(uuid, run_id, lease.token)
        if step is not Step.DONE:
            self.end_here(lease, step)  # LOST: another copy ends it; CANCELED: a cancel came first
        state = JobState.COMPLETED
    metrics.instruments().jobs.labels(state.value).inc()
    names.queue_delivery(self.app, uuid, run_id)
    log.info("job_finished", status=state.value)
    return {"uuid": uuid, "status": state.value}
