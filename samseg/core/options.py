"""A job's effective options: what it asked for (`JobMessage.options`), else the server's settings."""

from __future__ import annotations

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


def resolve_options(options: JobOptions | None, settings: Settings) -> EffectiveOptions:
    """Each option the job set, else the server's; checks the server's limits first (see check_server_limits)."""
    check_server_limits(options, settings)
    base = server_options(settings)
    if options is None:
        return base
    return base.model_copy(update=options.model_dump(exclude_none=True))


# The job message's optional fields (issue 16) that this server version validates but does not carry out yet:
# per-job options, extra outputs, deadlines, progress events. A job that sets one is refused with the field
# named — never run as if it had not been set.
NOT_YET_HONOURED = ("options", "outputs", "ttl_seconds", "events")


def not_yet_honoured(job: JobMessage) -> list[str]:
    """The optional fields `job` sets that this server does not carry out yet (empty: the job can run)."""
    return [name for name in NOT_YET_HONOURED if getattr(job, name) not in (None, [])]
