"""Wire formats: what crosses a process boundary, in one place.

The ingress message and the callback body are contracts with the app server; the job status is the
API's contract with its clients. Changing a field name here is a breaking change.
"""

from __future__ import annotations

import re
from enum import StrEnum
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StringConstraints

# A uuid names a folder and a URL path segment, so it must be a safe identifier: no separators, no dots
# at the start, nothing that needs escaping. UUIDs, ULIDs and most app-side ids fit.
UUID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,127}$")


def _safe_uuid(value: str) -> str:
    if not UUID_PATTERN.fullmatch(value):
        raise ValueError("uuid must be 1-128 characters of letters, digits, '-' and '_', starting alphanumeric")
    return value


JobId = Annotated[str, AfterValidator(_safe_uuid)]


class JobMessage(BaseModel):
    """The raw JSON body the app server puts on the jobs queue (and POST /jobs accepts)."""

    model_config = ConfigDict(extra="ignore")

    uuid: JobId  # exact: no trimming, it becomes a folder and URL segment
    image_url: Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=4096)]


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


class CallbackBody(BaseModel):
    """PATCH body sent to the app server: `completed` with segments, or `failed` with an error."""

    uuid: str
    status: Literal["completed", "failed"]
    segments: list[Segment] = Field(default_factory=list)
    error: ErrorInfo | None = None
    image_width: int | None = None
    image_height: int | None = None


class JobState(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"


class Stage(StrEnum):
    DOWNLOAD = "download"
    SEGMENT = "segment"
    PERSIST = "persist"
    NOTIFY = "notify"


class OutboxState(StrEnum):
    """Where a run's one terminal callback is (samseg.worker.lifecycle's outbox).

    pending: due at `next_attempt_at`; sending: an attempt holds the send marker until `sending_until`;
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


class JobAccepted(BaseModel):
    uuid: str
    status: JobState = JobState.QUEUED
    status_url: str
