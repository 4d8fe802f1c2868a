"""Wire formats: what crosses a process boundary, in one place.

The ingress message and the callback body are contracts with the app server; the job status is the
API's contract with its clients. Changing a field name here is a breaking change.
"""

from __future__ import annotations

import re
from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    StringConstraints,
    ValidationInfo,
    field_validator,
    model_serializer,
)

# A uuid names a folder and a URL path segment, so it must be a safe identifier: no separators, no dots
# at the start, nothing that needs escaping. UUIDs, ULIDs and most app-side ids fit.
UUID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,127}$")


def _safe_uuid(value: str) -> str:
    if not UUID_PATTERN.fullmatch(value):
        raise ValueError("uuid must be 1-128 characters of letters, digits, '-' and '_', starting alphanumeric")
    return value


JobId = Annotated[str, AfterValidator(_safe_uuid)]


# The hard limits of a job's `options.points_per_side`; a server may lower the maximum (Settings
# `job_max_points_per_side`), passed to validation as context {"max_points_per_side": N} or checked after
# validation by `samseg.core.options.resolve_options`.
POINTS_PER_SIDE_MIN = 4
POINTS_PER_SIDE_MAX = 64
MAX_POINTS_PER_SIDE_CONTEXT = "max_points_per_side"

OutputKind = Literal["coco_rle", "polygons", "label_map", "overlay"]
SortBy = Literal["area", "predicted_iou"]
JobEvent = Literal["running"]


class JobOptions(BaseModel):
    """Per-job tuning of the automatic mask generator and of the outputs; a missing field = the server's setting.

    Strict: unknown keys, wrong JSON types ("32" for an int, 1 for a bool) and out-of-range values are
    refused, each error naming its field (`options.points_per_side`, …).
    """

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    points_per_side: int | None = Field(None, ge=POINTS_PER_SIDE_MIN, le=POINTS_PER_SIDE_MAX)
    pred_iou_thresh: float | None = Field(None, ge=0.0, le=1.0)
    stability_score_thresh: float | None = Field(None, ge=0.0, le=1.0)
    box_nms_thresh: float | None = Field(None, gt=0.0, le=1.0)
    min_mask_region_area: int | None = Field(None, ge=0, le=10_000)
    max_masks: int | None = Field(None, ge=1, le=1000)
    sort_by: SortBy | None = None
    multimask_output: bool | None = None
    polygon_tolerance: float | None = Field(None, ge=0.0, le=10.0)

    @model_serializer(mode="wrap")
    def _omit_unset(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        """Only the options the job set: the others are the server's, and say so by their absence."""
        data: dict[str, Any] = handler(self)
        return {key: value for key, value in data.items() if value is not None}

    @field_validator("points_per_side")
    @classmethod
    def _server_cap(cls, value: int | None, info: ValidationInfo) -> int | None:
        cap = info.context.get(MAX_POINTS_PER_SIDE_CONTEXT) if isinstance(info.context, dict) else None
        if value is not None and isinstance(cap, int) and value > cap:
            raise ValueError(f"this server allows at most {cap} points per side")
        return value


def _unique(values: list[str]) -> list[str]:
    return list(dict.fromkeys(values))


class JobMessage(BaseModel):
    """The raw JSON body the app server puts on the jobs queue (and POST /jobs accepts).

    Only `uuid` and `image_url` are required; a message with just those is processed exactly as before the
    optional fields existed. Unknown top-level keys are ignored (as they always were); the optional fields
    themselves are strict.
    """

    model_config = ConfigDict(extra="ignore")

    uuid: JobId  # exact: no trimming, it becomes a folder and URL segment
    image_url: Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=4096)]
    options: JobOptions | None = None
    # Extra outputs next to the mask PNGs (none by default); duplicates are dropped, order kept.
    outputs: Annotated[list[OutputKind], AfterValidator(_unique)] = Field(default_factory=list, strict=True)
    # The job's deadline, in seconds from when it was sent (SQS SentTimestamp, or the POST /jobs time): a job
    # whose segmentation has not started by then fails `expired`, the model never run; None = SAMSEG_JOB_TTL_SECONDS.
    ttl_seconds: int | None = Field(None, ge=10, le=604_800, strict=True)
    # Progress callbacks wanted besides the final one: "running" = a PATCH with status "running" when work starts.
    events: Annotated[list[JobEvent], AfterValidator(_unique)] = Field(default_factory=list, strict=True)

    @model_serializer(mode="wrap")
    def _omit_absent(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        """Optional fields a job did not set are left out: a plain job dumps as `{"uuid", "image_url"}`, as
        it always did (on the queue, in the chain's task arguments)."""
        data: dict[str, Any] = handler(self)
        for key in ("options", "outputs", "ttl_seconds", "events"):
            if key in data and data[key] in (None, []):
                del data[key]
        return data


class CancelMessage(BaseModel):
    """`{"uuid": …, "action": "cancel"}` on the jobs queue: stop the job if it has not finished."""

    model_config = ConfigDict(extra="forbid")

    uuid: JobId
    action: Literal["cancel"]


def parse_message(data: object, *, max_points_per_side: int | None = None) -> JobMessage | CancelMessage:
    """One jobs-queue body (already JSON-decoded): a cancel when it has an `action` key, else a job.

    Raises pydantic's ValidationError, whose errors name the field (`options.max_masks`, `action`, …).
    `max_points_per_side` is the server's cap on `options.points_per_side`.
    """
    if isinstance(data, dict) and "action" in data:
        return CancelMessage.model_validate(data)
    context = {MAX_POINTS_PER_SIDE_CONTEXT: max_points_per_side} if max_points_per_side is not None else None
    return JobMessage.model_validate(data, context=context)


class BBox(BaseModel):
    x: int
    y: int
    width: int
    height: int


class Point(BaseModel):
    x: int
    y: int


class Segment(BaseModel):
    segment_id: int
    mask_url: str
    bbox: BBox
    area: int
    stability_score: float
    predicted_iou: float
    center_point: Point


def _no_host_paths(value: str | None) -> str | None:
    from samseg.core.errors import scrub_host_paths

    return scrub_host_paths(value) if value else value


class ErrorInfo(BaseModel):
    code: str
    # Built from exception texts (an OSError names its file): host paths are scrubbed wherever it is built,
    # so neither the callback nor GET /jobs/{uuid} shows the worker's directories.
    message: Annotated[str, AfterValidator(_no_host_paths)]


class CocoRle(BaseModel):
    """COCO compressed RLE of one mask: `pycocotools.mask.decode({"size": size, "counts": counts})`."""

    size: tuple[int, int]  # [height, width]
    counts: str


# GeoJSON MultiPolygon coordinates in pixel space: polygons → rings (outer first, then holes) → [x, y],
# integer pixel corners (docs/outputs.md).
Vertex = Annotated[list[int], Field(min_length=2, max_length=2)]
MultiPolygonCoords = list[list[list[Vertex]]]


class ResultSegment(Segment):
    """A segment as result.json has it: the callback's fields plus the requested per-mask encodings."""

    rle: CocoRle | None = None  # with outputs "coco_rle"
    polygons: MultiPolygonCoords | None = None  # with outputs "polygons", unless polygons_error says why not
    polygons_error: ErrorInfo | None = None  # e.g. code "polygon_too_complex": the mask has no polygons


CallbackStatusName = Literal["completed", "failed", "canceled", "running"]


class CallbackBody(BaseModel):
    """PATCH body sent to the app server: `completed` with segments, or `failed` with an error.

    `canceled`: the job was canceled before it finished (no segments). `running`: a progress event, sent only
    to jobs that asked for it (`events: ["running"]`). The `*_url`s are set when the asset exists.
    """

    uuid: str
    status: CallbackStatusName
    segments: list[Segment] = Field(default_factory=list)
    error: ErrorInfo | None = None
    image_width: int | None = None
    image_height: int | None = None
    result_url: str | None = None  # the full result.json (with rle/polygons when requested)
    label_map_url: str | None = None  # with outputs "label_map": 16-bit grayscale PNG
    overlay_url: str | None = None  # with outputs "overlay": JPEG preview


class EffectiveOptions(BaseModel):
    """The options a job actually ran with (its own, else the server's): result.json's `params`."""

    model_config = ConfigDict(frozen=True)

    points_per_side: int
    pred_iou_thresh: float
    stability_score_thresh: float
    box_nms_thresh: float
    min_mask_region_area: int
    max_masks: int | None = None  # None: no cap (left out of result.json)
    sort_by: SortBy
    multimask_output: bool
    polygon_tolerance: float


class ModelInfo(BaseModel):
    config: str  # the SAM-2 config (e.g. "sam2.1_hiera_tiny")
    checkpoint_sha256: str


class ResultDocument(BaseModel):
    """`{uuid}/result.json`: everything the callback says, plus the parameters, versions and encodings."""

    uuid: str
    status: CallbackStatusName
    segments: list[ResultSegment] = Field(default_factory=list)
    error: ErrorInfo | None = None
    image_width: int | None = None
    image_height: int | None = None
    result_url: str | None = None  # where this document is served (the callback's `result_url`)
    label_map_url: str | None = None
    overlay_url: str | None = None
    params: EffectiveOptions | None = None
    outputs: list[OutputKind] = Field(default_factory=list)
    model: ModelInfo | None = None
    samseg_version: str | None = None

    def callback_body(self) -> CallbackBody:
        """The callback for this result: the same fields, segments without their rle/polygons (those stay here)."""
        return CallbackBody(
            uuid=self.uuid,
            status=self.status,
            segments=[Segment.model_validate(s.model_dump(include=set(Segment.model_fields))) for s in self.segments],
            error=self.error,
            image_width=self.image_width,
            image_height=self.image_height,
            result_url=self.result_url,
            label_map_url=self.label_map_url,
            overlay_url=self.overlay_url,
        )


class JobState(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELED = "canceled"


class Stage(StrEnum):
    DOWNLOAD = "download"
    SEGMENT = "segment"
    PERSIST = "persist"
    NOTIFY = "notify"


class OutboxState(StrEnum):
    """Where a run's one terminal callback is (samseg.worker.lifecycle's outbox).

    pending: due at `next_attempt_at`; sending: an attempt holds the send marker until `sending_until` (once
    that has passed, another attempt takes it over at `reclaim_at`, leaving a live holder time to record);
    delivered: the app server answered 2xx; gone: it answered 410 (stop); rejected: it answered another 4xx
    (the body will not change, so it is not retried); expired: the delivery horizon
    (SAMSEG_CALLBACK_HORIZON_SECONDS) or SAMSEG_CALLBACK_MAX_ATTEMPTS was spent; skipped: no app server is
    configured.
    """

    PENDING = "pending"
    SENDING = "sending"
    DELIVERED = "delivered"
    GONE = "gone"
    REJECTED = "rejected"
    EXPIRED = "expired"
    SKIPPED = "skipped"


class CallbackStatus(BaseModel):
    """The callback outbox of one run, as GET /jobs/{uuid} shows it."""

    delivered: bool
    attempts: int
    http_status: int | None = None
    error: Annotated[str | None, AfterValidator(_no_host_paths)] = None
    state: OutboxState | None = None
    first_attempt_at: float | None = None
    next_attempt_at: float | None = None
    sending_until: float | None = None
    reclaim_at: float | None = None

    @property
    def open(self) -> bool:
        """Still to be sent (pending, or an attempt in flight)."""
        return self.state in (OutboxState.PENDING, OutboxState.SENDING)


class JobStatus(BaseModel):
    """GET /jobs/{uuid}: where a job is, and its result once it has one."""

    uuid: str
    status: JobState
    stage: Stage | None = None
    updated_at: float
    run_id: str | None = None
    segments: list[Segment] | None = None
    error: ErrorInfo | None = None
    callback: CallbackStatus | None = None
    # DELETE /jobs/{uuid} reached a running stage: it ends the job `canceled` at its next boundary.
    cancel_requested: bool | None = None


class JobAccepted(BaseModel):
    uuid: str
    status: JobState = JobState.QUEUED
    status_url: str
