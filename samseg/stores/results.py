"""From masks to the callback body and the job folder — shared by the pipeline and `samseg segment`."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from pydantic import BaseModel

from samseg.core.contracts import BBox, CallbackBody, Point, Segment
from samseg.core.errors import JobError
from samseg.core.masks import PackedMasks, encode_packed_png, mask_filename, packed_geometry
from samseg.stores.blobs import BlobStore, LocalBlobs, Upload

MASK_DIR = "mask_images"
RESULT_FILE = "result.json"


def mask_path(uuid: str, index: int) -> str:
    """The mask's path under the API (and its key in the blob store): the `mask_url` contract."""
    return f"/assets/{uuid}/{MASK_DIR}/{mask_filename(index)}"


def describe_segments(
    masks: PackedMasks,
    predicted_iou: Sequence[float],
    stability_score: Sequence[float],
    url_for: Callable[[int], str],
) -> list[Segment]:
    """One Segment per mask; geometry is measured on the mask itself, so it matches the PNG exactly."""
    segments: list[Segment] = []
    for index in range(len(masks)):
        geometry = packed_geometry(masks.read(index), masks.width)
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


def completed_body(
    uuid: str,
    masks: PackedMasks,
    predicted_iou: Sequence[float],
    stability_score: Sequence[float],
    url_for: Callable[[int], str],
    height: int,
) -> CallbackBody:
    """The `completed` callback body (and result.json) of one job: the persist stage's and `samseg segment`'s."""
    segments = describe_segments(masks, predicted_iou, stability_score, url_for)
    return CallbackBody(uuid=uuid, status="completed", segments=segments, image_width=masks.width, image_height=height)


def write_result(
    blobs: BlobStore,
    prefix: str,
    masks: PackedMasks,
    body: BaseModel,
    write_outputs: Callable[[], None] | None = None,
) -> None:
    """The masks as PNGs (encoded and uploaded concurrently, a few at a time), the job-level outputs, then
    result.json (a CallbackBody or a ResultDocument), last."""

    def uploads() -> Iterator[Upload]:
        for index in range(len(masks)):
            yield Upload(
                f"{prefix}{MASK_DIR}/{mask_filename(index)}",
                lambda i=index: encode_packed_png(masks.read(i), masks.width),  # type: ignore[misc]
                "image/png",
            )

    blobs.put_many(uploads())
    if write_outputs is not None:
        write_outputs()
    blobs.put(f"{prefix}{RESULT_FILE}", body.model_dump_json(exclude_none=True).encode(), "application/json")


def write_job_folder(folder: Path, masks: PackedMasks, body: CallbackBody) -> None:
    """`samseg segment`'s output: mask_images/ and result.json in a plain folder."""
    write_result(LocalBlobs(folder), "", masks, body)
