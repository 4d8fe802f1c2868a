"""The optional outputs of a job (issue #16) over a BlobStore: per-segment encodings for result.json, and the
job-level label map and overlay files. Written for the persist stage to call; see docs/outputs.md.

    {uuid}/label_map.png     outputs "label_map"  (label_map_url)
    {uuid}/overlay.jpg       outputs "overlay"    (overlay_url)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from PIL import Image

from samseg.core.contracts import EffectiveOptions, OutputKind, ResultSegment, Segment
from samseg.core.outputs import (
    LABEL_MAP_FILE,
    OVERLAY_FILE,
    PackedMaskSource,
    encode_label_map_png,
    encode_segment,
    label_map,
    overlay_from_labels,
)
from samseg.stores.blobs import BlobStore


def asset_path(uuid: str, name: str) -> str:
    """The API path of a job-level asset (the `*_url` contract, like `mask_path` for masks)."""
    return f"/assets/{uuid}/{name}"


def result_segments(
    masks: PackedMaskSource,
    segments: Sequence[Segment],
    outputs: Sequence[OutputKind],
    params: EffectiveOptions,
    max_vertices: int,
) -> list[ResultSegment]:
    """result.json's segments: each callback segment plus `rle` / `polygons` (or `polygons_error`) as asked."""
    want_rle, want_polygons = "coco_rle" in outputs, "polygons" in outputs
    result: list[ResultSegment] = []
    for segment in segments:
        extra = {}
        if want_rle or want_polygons:
            encoded = encode_segment(
                masks.read(segment.segment_id),
                masks.width,
                rle=want_rle,
                polygons=want_polygons,
                tolerance=params.polygon_tolerance,
                max_vertices=max_vertices,
            )
            extra = {"rle": encoded.rle, "polygons": encoded.polygons, "polygons_error": encoded.polygons_error}
        result.append(ResultSegment(**segment.model_dump(), **extra))
    return result


@dataclass(frozen=True)
class JobAssets:
    """The job-level files written, by their API paths (None: not asked for)."""

    label_map_url: str | None = None
    overlay_url: str | None = None


def write_job_outputs(
    blobs: BlobStore,
    uuid: str,
    masks: PackedMaskSource,
    areas: Sequence[int],
    outputs: Sequence[OutputKind],
    image: Callable[[], Image.Image] | None = None,
) -> JobAssets:
    """Write `{uuid}/label_map.png` and/or `{uuid}/overlay.jpg` (one label map serves both). `image` opens the
    job's image (RGB, the masks' size); needed for "overlay" only. Call before result.json is written."""
    if "label_map" not in outputs and "overlay" not in outputs:
        return JobAssets()
    labels = label_map(masks, areas)
    label_map_url = overlay_url = None
    if "label_map" in outputs:
        blobs.put(f"{uuid}/{LABEL_MAP_FILE}", encode_label_map_png(labels), "image/png")
        label_map_url = asset_path(uuid, LABEL_MAP_FILE)
    if "overlay" in outputs:
        if image is None:
            raise ValueError("outputs has 'overlay' but no image was given")
        with image() as picture:
            blobs.put(f"{uuid}/{OVERLAY_FILE}", overlay_from_labels(picture, labels), "image/jpeg")
        overlay_url = asset_path(uuid, OVERLAY_FILE)
    return JobAssets(label_map_url=label_map_url, overlay_url=overlay_url)
