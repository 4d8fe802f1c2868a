"""A job's effective options: what it asked for (`JobMessage.options`), else the server's settings."""

from __future__ import annotations

import hashlib
import json

from pydantic import ValidationError
from pydantic_core import InitErrorDetails, PydanticCustomError

from samseg.core.contracts import EffectiveOptions, JobMessage, JobOptions
from samseg.core.settings import Settings


def server_options(settings: Settings) -> EffectiveOptions:
    """The options of a job that sets none: exactly how jobs ran before per-job options existed."""
    return EffectiveOptions(
        points_per_side=settings.amg_points_per_side,
        pred_iou_thresh=settings.amg_pred_iou_thresh,
        stability_score_thresh=settings.amg_stability_score_thresh,
        box_nms_thresh=settings.amg_box_nms_thresh,
        min_mask_region_area=settings.amg_min_mask_region_area,
        max_masks=settings.amg_max_masks,
        sort_by=settings.amg_sort_by,
        multimask_output=settings.amg_multimask_output,
        polygon_tolerance=settings.polygon_tolerance,
    )


def check_server_limits(options: JobOptions | None, settings: Settings) -> None:
    """Raise a ValidationError (field `options.points_per_side`) when the job asks for more than this server allows.

    The same check `parse_message(..., max_points_per_side=...)` makes during validation, for a message that
    was validated without that context.
    """
    cap = settings.job_max_points_per_side
    if options is not None and options.points_per_side is not None and options.points_per_side > cap:
        error = PydanticCustomError("server_limit", "this server allows at most {cap} points per side", {"cap": cap})
        details: list[InitErrorDetails] = [
            {"type": error, "loc": ("options", "points_per_side"), "input": options.points_per_side}
        ]
        raise ValidationError.from_exception_data("JobMessage", details)


def fingerprint(job: JobMessage) -> str:
    """What the job asks for — image_url, options (as sent), outputs (as a set) — as a short hash.

    The re-send rules compare it (samseg.stores.jobs.JobStore.claim): the same uuid with the same fingerprint is
    the same job; `ttl_seconds` and `events` are not part of it (re-sending with a new deadline is the same job).
    """
    options = job.options.model_dump() if job.options is not None else {}
    canonical = json.dumps(
        {"image_url": job.image_url, "options": options, "outputs": sorted(job.outputs)},
        sort_keys=True,
        separators=(",", ":"),
    )
    return hashlib.sha256(canonical.encode()).hexdigest()[:32]


def job_deadline(job: JobMessage, sent_at: float, settings: Settings) -> float | None:
    """When the job's segmentation must have started (epoch seconds): `sent_at` (SQS SentTimestamp, or the
    POST /jobs time) plus its `ttl_seconds`, else SAMSEG_JOB_TTL_SECONDS; None: no deadline."""
    ttl = job.ttl_seconds if job.ttl_seconds is not None else settings.job_ttl_seconds
    return None if ttl is None else sent_at + ttl


def resolve_options(options: JobOptions | None, settings: Settings) -> EffectiveOptions:
    """Each option the job set, else the server's; checks the server's limits first (see check_server_limits)."""
    check_server_limits(options, settings)
    base = server_options(settings)
    if options is None:
        return base
    return base.model_copy(update=options.model_dump(exclude_none=True))
