"""The job's chain: download → segment → persist → notify, and what happens when a link fails.

Tasks pass a small dict (`uuid`, `image_url`, `run_id`, image size, counts) — never pixels: SQS messages are
capped at 256 KiB, so the image and the masks travel as work files in the blob store, keyed by run
(`.samseg/work/{uuid}/{run_id}/…`), which every host reaches (a local directory on one host, S3 on several).

Every status write names its run and is conditional (samseg.stores.jobs): a stage whose write is refused
belongs to a run that was replaced or has moved past it (a redelivered message), and stops its chain
there. Any failure reaches `on_job_error`, which records it and queues the `failed` callback, so every run
ends in exactly one callback.
"""

from __future__ import annotations

import errno
import json
import os
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import structlog
from billiard.exceptions import TimeLimitExceeded
from botocore.exceptions import BotoCoreError, ClientError
from celery import Task, chain
from celery.exceptions import Ignore, Reject, Retry, SoftTimeLimitExceeded

from samseg.core.contracts import CallbackBody, CallbackStatus, ErrorInfo, JobMessage, JobState, Stage
from samseg.core.errors import JobError, is_transient
from samseg.core.masks import PackedMasks, write_packed_masks
from samseg.core.settings import Settings, get_settings
from samseg.ops import metrics
from samseg.ops.watchdog import RunningTask, held_message, on_hard_timeout
from samseg.queue.sqs import JobQueues, probe_client
from samseg.runtime.segmenter import get_segmenter
from samseg.stores import Stores, build_stores
from samseg.stores.layout import work_key
from samseg.stores.results import describe_segments, mask_path
from samseg.stores.signed_urls import signed_mask_url
from samseg.transfer.callbacks import send_callback, webhook_id_for
from samseg.transfer.image_fetch import download_image, load_rgb, probe_image
from samseg.worker.app import app

log = structlog.get_logger(__name__)

SOURCE_FILE = "source"
MASKS_FILE = "masks.npy"
SCORES_FILE = "scores.json"

STAGE_RETRIES = 15
_limits = get_settings()  # task options are fixed when the task is declared; everything else reads self.settings
NOTIFY_TIME_LIMIT = int(
    _limits.callback_max_attempts * (_limits.callback_timeout_seconds + _limits.callback_backoff_max_seconds) + 60
)


class StageTask(Task):  # type: ignore[misc]
    """Base of samseg's tasks: Settings, the stores built once per worker process (after any fork), and
    retries through outages.

    A stage that cannot reach SQS, S3 or the job store (samseg.core.errors.is_transient) is not a failed job: it is
    published again with a growing delay (5 s doubling to 5 min, STAGE_RETRIES times ≈ 1 h) and its message
    acknowledged. If even that publish fails (SQS itself is down), the acknowledgement fails too and SQS
    redelivers the message after its visibility timeout. Either way the run resumes where it stopped.
    """

    _stores: tuple[int, Stores] | None = None

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return super().__call__(*args, **kwargs)
        except (Retry, Reject, Ignore):
            raise  # Celery's own control flow (a retry already scheduled), whatever caused it
        except Exception as exc:
            if not is_transient(exc) or self.request.called_directly:
                raise
            retries = int(self.request.retries or 0)
            delay = min(300, 5 * 2**retries)
            log.warning("stage_retry_after_outage", error=repr(exc)[:300], retries=retries, retry_in_seconds=delay)
            raise self.retry(exc=exc, countdown=delay, max_retries=STAGE_RETRIES) from exc

    @property
    def settings(self) -> Settings:
        return get_settings()

    @property
    def stores(self) -> Stores:
        """One set per process, shared by every stage task (set on StageTask itself, not on each task class)."""
        cached = StageTask._stores
        if cached is None or cached[0] != os.getpid():
            cached = StageTask._stores = (os.getpid(), build_stores(self.settings))
        return cached[1]

    def enter(self, job: dict[str, Any], stage: Stage) -> bool:
        """Record that `stage` of the job's run starts; False (and the chain stops here) if the store refuses.

        Refused: the record belongs to another run (this one was replaced), or the run already went past
        this stage — SQS delivered the message again after its work was done. Running it again would
        redo finished work and publish the rest of the chain a second time.
        """
        if self.stores.jobs.advance(job["uuid"], job["run_id"], JobState.RUNNING, stage):
            return True
        record = self.stores.jobs.get(job["uuid"])
        log.info(
            "stage_skipped",
            run_id=job["run_id"],
            current_run=record.run_id if record else None,
            current_status=record.status.value if record else None,
            current_stage=record.stage.value if record and record.stage else None,
        )
        self.request.chain = None  # Celery publishes the next link from this after the task returns
        return False

    @contextmanager
    def scratch(self) -> Iterator[Path]:
        """A host-local temporary folder for files on their way to or from the blob store."""
        root = self.settings.scratch_dir
        root.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=root) as folder:
            yield Path(folder)

    def fetch_work(self, job: dict[str, Any], name: str, dest: Path) -> Path:
        if not self.stores.blobs.get_file(work_key(job["uuid"], job["run_id"], name), dest):
            raise JobError("work_missing", f"the run's work file {name} is gone (purged, or another run replaced it)")
        return dest


def build_chain(job: JobMessage, run_id: str) -> Any:
    """The four stages with deterministic task ids ({uuid}.{stage}) so logs and redeliveries line up."""
    payload = {"uuid": job.uuid, "image_url": job.image_url, "run_id": run_id}
    return chain(
        download.si(payload).set(task_id=f"{job.uuid}.download"),
        segment.s().set(task_id=f"{job.uuid}.segment"),
        persist.s().set(task_id=f"{job.uuid}.persist"),
        notify.s().set(task_id=f"{job.uuid}.notify"),
    ).on_error(on_job_error.s())


@app.task(name="samseg.download", bind=True, base=StageTask, throws=(JobError,))
def download(self: StageTask, job: dict[str, Any]) -> dict[str, Any]:
    if not self.enter(job, Stage.DOWNLOAD):
        return job
    with self.scratch() as tmp, _storage_errors():
        size = download_image(job["image_url"], tmp / SOURCE_FILE, self.settings)
        info = probe_image(tmp / SOURCE_FILE, self.settings)
        self.stores.blobs.put_file(work_key(job["uuid"], job["run_id"], SOURCE_FILE), tmp / SOURCE_FILE)
    log.info("image_downloaded", bytes=size, width=info.width, height=info.height, format=info.format)
    return {**job, "bytes": size}


@app.task(
    name="samseg.segment",
    bind=True,
    base=StageTask,
    throws=(JobError,),
    time_limit=_limits.segment_time_limit_seconds,
    # The soft limit leaves the task time to fail cleanly (status, callback) before the hard kill.
    soft_time_limit=max(0.8 * _limits.segment_time_limit_seconds, _limits.segment_time_limit_seconds - 30),
)
def segment(self: StageTask, job: dict[str, Any]) -> dict[str, Any]:
    if not self.enter(job, Stage.SEGMENT):
        return job
    settings = self.settings
    with self.scratch() as tmp:
        with _storage_errors():
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
        with _storage_errors():
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


@app.task(name="samseg.persist", bind=True, base=StageTask, throws=(JobError,))
def persist(self: StageTask, job: dict[str, Any]) -> dict[str, Any]:
    if not self.enter(job, Stage.PERSIST):
        return job
    uuid, settings = job["uuid"], self.settings
    started = time.perf_counter()
    now = time.time()  # one expiry for every signed mask URL of the job
    with self.scratch() as tmp, _storage_errors():
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
    metrics.MASKS_PER_JOB.observe(len(segments))
    log.info("masks_persisted", masks=len(segments), seconds=round(time.perf_counter() - started, 3))
    return {**job, "mask_count": len(segments)}


@app.task(
    name="samseg.transfer.callbacks",
    bind=True,
    base=StageTask,
    time_limit=NOTIFY_TIME_LIMIT,
    soft_time_limit=NOTIFY_TIME_LIMIT - 10,
)
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
        metrics.CALLBACKS.labels("delivered" if delivery.delivered else "failed").inc()
    callback = CallbackStatus(
        delivered=delivery.delivered, attempts=delivery.attempts, http_status=delivery.http_status, error=delivery.error
    )
    if not delivery.delivered and delivery.attempts > 0 and error is None:
        error = ErrorInfo(code="callback_failed", message=f"the callback was not accepted: {delivery.error}")
    state = JobState.FAILED if error else JobState.COMPLETED
    metrics.JOBS.labels(state.value).inc()
    return {"status": state.value, "error": error.model_dump() if error else None, "callback": callback.model_dump()}


@app.task(name="samseg.on_job_error", base=StageTask)
def on_job_error(request: Any, exc: BaseException, traceback: Any) -> None:
    """Errback of every link: record the failure and queue the run's `failed` callback.

    Not `bind=True`: Celery passes (request, exc, traceback) only to errbacks whose signature has exactly
    those three parameters; the task instance (its stores) is reached through its own name instead.
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
    fail_run(self.stores, uuid, run_id, error, callback=getattr(request, "task", None) != notify.name)


def fail_run(stores: Stores, uuid: str, run_id: str, error: ErrorInfo, *, callback: bool = True) -> bool:
    """End a run as failed — one conditional write — and queue its `failed` callback.

    False (and nothing sent) when the record belongs to another run or the run already ended: each run gets
    exactly one terminal callback, whichever of the errback, the watchdog or the dead-letter reaper gets here.
    """
    if not stores.jobs.advance(uuid, run_id, JobState.FAILED, error=error):
        log.info("run_already_ended_or_replaced", job_uuid=uuid, run_id=run_id, code=error.code)
        return False
    if callback:
        payload = {"uuid": uuid, "run_id": run_id, "error": error.model_dump()}
        notify.apply_async((payload,), task_id=f"{uuid}.notify")
    return True


@on_hard_timeout
def _fail_hung_task(task: RunningTask) -> None:
    """The watchdog's hook (solo/threads pools): a stage stuck in a C call past its hard limit.

    The worker exits right after this (the stuck thread cannot be stopped), so: fail the run (`timeout`),
    queue its callback, then acknowledge its message — in that order, so an outage in between leaves the
    message to be retried rather than a job without a callback.
    """
    job = task.job or {}
    uuid, run_id = job.get("uuid"), job.get("run_id")
    if not uuid or not run_id:
        return
    settings = get_settings()
    error = ErrorInfo(
        code="timeout", message=f"{task.name} passed its hard time limit stuck outside Python; the worker restarts"
    )
    fail_run(build_stores(settings), uuid, run_id, error, callback=task.name != notify.name)
    held = held_message(task.request)
    if held is not None:
        probe_client(settings).delete_message(QueueUrl=held[0], ReceiptHandle=held[1])


@app.task(name="samseg.reap_dead_tasks", bind=True, base=StageTask)
def reap_dead_tasks(self: StageTask) -> int:
    """Beat, every minute: stage messages SQS dead-lettered (their worker died on every delivery — the kernel's
    OOM killer on one huge image, a segfault) end their run as failed with `worker_lost`."""
    from samseg.queue.dead_letters import DeadLetter, reap_task_dead_letters

    def handle(letter: DeadLetter) -> bool:
        dead = letter.task
        if dead is None or dead.job_uuid is None or dead.run_id is None:
            log.error("dead_task_unreadable", message_id=letter.message_id, error=letter.error, body=letter.body[:300])
            return True  # nothing to end; it stays visible in the log
        error = ErrorInfo(
            code="worker_lost",
            message=f"{dead.task} killed its worker on each of {letter.receive_count} deliveries (out of memory?)",
        )
        fail_run(self.stores, dead.job_uuid, dead.run_id, error, callback=dead.task != notify.name)
        return True

    return reap_task_dead_letters(JobQueues(self.settings), handle)


def error_info(exc: BaseException) -> ErrorInfo:
    if isinstance(exc, JobError):
        return ErrorInfo(code=exc.code, message=exc.message)
    if isinstance(exc, SoftTimeLimitExceeded | TimeLimitExceeded):
        return ErrorInfo(code="timeout", message=f"the task ran past its time limit ({exc!r})")
    return ErrorInfo(code="internal_error", message=f"{type(exc).__name__}: {exc}")


@contextmanager
def _storage_errors() -> Iterator[None]:
    """Blob-store failures as job errors with a code the app server can act on."""
    try:
        yield
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise JobError("disk_full", f"no space left for the job's files: {exc}") from exc
        if is_transient(exc):
            raise  # an outage: the stage is retried (StageTask.__call__)
        raise JobError("storage_error", f"cannot read or write the job's files: {exc}") from exc
    except (ClientError, BotoCoreError) as exc:
        if is_transient(exc):
            raise
        raise JobError("storage_error", f"the object store refused the request: {exc}") from exc


@app.task(name="samseg.stores.purge", bind=True, base=StageTask)
def purge(self: StageTask) -> dict[str, int]:
    from samseg.stores.purge import purge_expired

    report = purge_expired(self.stores, self.settings)
    log.info("assets_purged", ttl_seconds=self.settings.asset_ttl_seconds, **report)
    return report
