"""From masks to the callback body and the job folder — shared by the pipeline and `samseg segment`."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import numpy.typing as npt

from samseg.contracts import BBox, CallbackBody, Point, Segment
from samseg.errors import JobError
from samseg.masks import mask_filename, mask_geometry, write_mask_pngs
from samseg.storage import MASK_DIR, RESULT_FILE, write_json_atomic


def mask_url(base_url: str, uuid: str, index: int) -> str:
    return f"{base_url}/assets/{uuid}/{MASK_DIR}/{mask_filename(index)}"


def describe_segments(
    masks: npt.NDArray[np.bool_],
    predicted_iou: Sequence[float],
    stability_score: Sequence[float],
    url_for: Callable[[int], str],
) -> list[Segment]:
    """One Segment per mask; geometry is measured on the mask itself, so it matches the PNG exactly."""
    segments: list[Segment] = []
    for index, mask in enumerate(masks):
        geometry = mask_geometry(mask)
        if geometry is None:  # segmentation drops empty masks; numbering must not have holes
            raise JobError("internal_error", f"mask {index} is empty")
        cx, cy = geometry.center
        segments.append(
            Segment(
                segment_id=index,
                mask_url=url_for(index),
                bbox=BBox(x=geometry.x, y=geometry.y, width=geometry.width, height=geometry.height),
                area=geometry.area,
                stability_score=round(float(stability_score[index]), 6),
                predicted_iou=round(float(predicted_iou[index]), 6),
                center_point=Point(x=cx, y=cy),
            )
        )
    return segments


def write_job_folder(folder: Path, masks: npt.NDArray[np.bool_], body: CallbackBody) -> None:
    write_mask_pngs(masks, folder / MASK_DIR)
    write_json_atomic(folder / RESULT_FILE, body.model_dump(mode="json", exclude_none=True))
