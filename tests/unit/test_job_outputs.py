"""samseg.stores.outputs: what the persist stage will write for a job's `outputs`."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from samseg.core.contracts import JobOptions
from samseg.core.masks import PackedMasks, write_packed_masks
from samseg.core.options import resolve_options
from samseg.core.outputs import label_map
from samseg.core.settings import Settings
from samseg.stores.blobs import LocalBlobs
from samseg.stores.outputs import result_segments, write_job_outputs
from samseg.stores.results import describe_segments, mask_path


@pytest.fixture
def job(tmp_path: Path) -> tuple[PackedMasks, list[np.ndarray]]:
    rng = np.random.default_rng(4)
    masks = []
    for _ in range(6):
        mask = np.zeros((48, 64), bool)
        y, x = rng.integers(0, 30), rng.integers(0, 40)
        mask[y : y + 18, x : x + 24] = rng.random((18, 24)) < 0.9
        masks.append(mask)
    write_packed_masks(tmp_path / "masks.npy", masks, len(masks), 48, 64)
    return PackedMasks(tmp_path / "masks.npy", 64), masks


def test_result_segments_carry_what_was_asked(job: tuple[PackedMasks, list[np.ndarray]]) -> None:
    packed, masks = job
    segments = describe_segments(packed, [0.9] * 6, [0.95] * 6, lambda i: mask_path("job-1", i))
    params = resolve_options(JobOptions(polygon_tolerance=0.0), Settings())
    both = result_segments(packed, segments, ["coco_rle", "polygons"], params, max_vertices=100_000)
    for segment, mask in zip(both, masks, strict=True):
        assert segment.rle is not None and segment.polygons is not None
        rle = {"size": list(segment.rle.size), "counts": segment.rle.counts.encode()}
        assert np.array_equal(mask_utils.decode(rle).astype(bool), mask)
        assert segment.model_dump(include=set(segments[0].model_dump())) == segments[segment.segment_id].model_dump()
    none = result_segments(packed, segments, [], params, max_vertices=100_000)
    assert all(s.rle is None and s.polygons is None for s in none)
    capped = result_segments(packed, segments, ["polygons"], params, max_vertices=100)
    assert all(s.polygons is None and s.polygons_error is not None for s in capped)
    assert capped[0].polygons_error.code == "polygon_too_complex"  # type: ignore[union-attr]


def test_label_map_and_overlay_files(tmp_path: Path, job: tuple[PackedMasks, list[np.ndarray]]) -> None:
    packed, masks = job
    blobs = LocalBlobs(tmp_path / "assets")
    areas = [int(m.sum()) for m in masks]
    picture = Image.new("RGB", (64, 48), (90, 90, 90))
    written = write_job_outputs(blobs, "job-1", packed, areas, ["label_map", "overlay"], image=lambda: picture.copy())
    assert written.label_map_url == "/assets/job-1/label_map.png"
    assert written.overlay_url == "/assets/job-1/overlay.jpg"
    with Image.open(io.BytesIO(blobs.get("job-1/label_map.png") or b"")) as image:
        assert np.array_equal(np.asarray(image).astype(np.uint16), label_map(packed, areas))
    with Image.open(io.BytesIO(blobs.get("job-1/overlay.jpg") or b"")) as image:
        assert image.format == "JPEG" and image.size == (64, 48)
    assert write_job_outputs(blobs, "job-2", packed, areas, ["coco_rle"]).label_map_url is None
    with pytest.raises(ValueError, match="overlay"):
        write_job_outputs(blobs, "job-3", packed, areas, ["overlay"])
