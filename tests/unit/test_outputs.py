"""samseg.core.outputs against the libraries a client decodes with: pycocotools for RLE, shapely for
polygons (point-in-polygon of every pixel centre, OGC validity), Pillow for the PNG and JPEG."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import shapely
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from PIL import Image
from pycocotools import mask as mask_utils
from shapely.geometry import LinearRing, shape

from samseg.core.contracts import ResultSegment
from samseg.core.masks import PackedMasks, write_packed_masks
from samseg.core.outputs import (
    PolygonTooComplex,
    coco_rle,
    coco_rle_packed,
    decode_coco_rle,
    decode_label_map_png,
    encode_label_map_png,
    encode_segment,
    label_map,
    outline_vertex_count,
    overlay,
    overlay_size,
    paint_order,
    polygons,
    polygons_packed,
)

small_masks = st.tuples(st.integers(1, 12), st.integers(1, 12)).flatmap(
    lambda shape: arrays(np.bool_, shape, elements=st.booleans())
)


def pycoco_encode(mask: np.ndarray) -> dict:
    return mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))


def special_masks() -> list[np.ndarray]:
    rng = np.random.default_rng(7)
    ring = np.zeros((9, 11), bool)
    ring[1:8, 2:10] = True
    ring[3:6, 4:8] = False
    ring[4, 5] = True  # an island inside the hole
    one = np.zeros((5, 7), bool)
    one[2, 3] = True
    checker = (np.indices((6, 7)).sum(axis=0) % 2).astype(bool)
    return [
        np.zeros((4, 5), bool),
        np.ones((4, 5), bool),
        np.ones((1, 1), bool),
        np.zeros((1, 1), bool),
        one,
        ring,
        checker,
        ~checker,
        rng.random((33, 17)) < 0.5,
        rng.random((101, 63)) < 0.9,
        rng.random((1, 50)) < 0.5,
        rng.random((50, 1)) < 0.5,
    ]


# --- COCO RLE --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mask", special_masks(), ids=lambda m: f"{m.shape[0]}x{m.shape[1]}-{int(m.sum())}")
def test_rle_is_pycocotools_encode_and_decodes_exactly(mask: np.ndarray) -> None:
    ours = coco_rle(mask)
    theirs = pycoco_encode(mask)
    assert ours["size"] == [mask.shape[0], mask.shape[1]]
    assert ours["counts"].encode() == theirs["counts"]
    decoded = mask_utils.decode({"size": ours["size"], "counts": ours["counts"].encode()})
    assert np.array_equal(decoded.astype(bool), mask)
    assert mask_utils.area({"size": ours["size"], "counts": ours["counts"].encode()}) == mask.sum()
    assert np.array_equal(decode_coco_rle(ours), mask)
    assert coco_rle_packed(np.packbits(mask, axis=1), mask.shape[1]) == ours


@settings(max_examples=300, deadline=None)
@given(small_masks)
def test_rle_property(mask: np.ndarray) -> None:
    ours = coco_rle(mask)
    assert ours["counts"].encode() == pycoco_encode(mask)["counts"]
    assert np.array_equal(decode_coco_rle({"size": ours["size"], "counts": pycoco_encode(mask)["counts"]}), mask)


def test_rle_of_a_large_blob_with_long_runs() -> None:
    yy, xx = np.ogrid[:768, :1024]
    mask = (yy - 400) ** 2 + (xx - 500) ** 2 < 300**2
    mask[:, 1023] = True  # ones up to the very last pixel
    ours = coco_rle(mask)
    assert ours["counts"].encode() == pycoco_encode(mask)["counts"]
    assert np.array_equal(mask_utils.decode({**ours, "counts": ours["counts"].encode()}).astype(bool), mask)


def test_rle_rejects_what_is_not_a_bool_mask() -> None:
    with pytest.raises(ValueError, match="bool"):
        coco_rle(np.zeros((3, 3), np.uint8))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="2-D"):
        coco_rle(np.zeros((3, 3, 1), bool))
    with pytest.raises(ValueError, match="covers"):
        decode_coco_rle({"size": [3, 3], "counts": "12"})


# --- polygons --------------------------------------------------------------------------------------------


def rasterise(coords: list, height: int, width: int) -> np.ndarray:
    """Independent check: which pixel centres the MultiPolygon contains (never on a boundary)."""
    if not coords:
        return np.zeros((height, width), bool)
    geometry = shape({"type": "MultiPolygon", "coordinates": coords})
    ys, xs = np.mgrid[0:height, 0:width]
    return shapely.contains_xy(geometry, xs + 0.5, ys + 0.5)


def check_exact(mask: np.ndarray, coords: list) -> None:
    assert np.array_equal(rasterise(coords, *mask.shape), mask)
    if not coords:
        return
    geometry = shape({"type": "MultiPolygon", "coordinates": coords})
    assert shapely.is_valid(geometry), shapely.is_valid_reason(geometry)
    assert geometry.area == mask.sum()
    for polygon in coords:
        for ring in polygon:
            assert ring[0] == ring[-1]  # closed
            assert len({tuple(v) for v in ring[:-1]}) == len(ring) - 1  # simple: no vertex twice
            assert all(isinstance(c, int) for v in ring for c in v)
        assert LinearRing(polygon[0]).is_ccw  # outer rings: positive shoelace area
        assert not any(LinearRing(hole).is_ccw for hole in polygon[1:])
    assert sum(len(r) - 1 for p in coords for r in p) == outline_vertex_count(mask)


@pytest.mark.parametrize("mask", special_masks(), ids=lambda m: f"{m.shape[0]}x{m.shape[1]}-{int(m.sum())}")
def test_polygons_at_tolerance_zero_are_exactly_the_mask(mask: np.ndarray) -> None:
    coords = polygons(mask)
    check_exact(mask, coords)
    assert polygons_packed(np.packbits(mask, axis=1), mask.shape[1]) == coords


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(small_masks)
def test_polygons_property(mask: np.ndarray) -> None:
    check_exact(mask, polygons(mask))


def test_diagonal_pixels_are_separate_polygons_touching_at_a_corner() -> None:
    mask = np.array([[1, 0], [0, 1]], bool)
    assert polygons(mask) == [
        [[[0, 0], [1, 0], [1, 1], [0, 1], [0, 0]]],
        [[[1, 1], [2, 1], [2, 2], [1, 2], [1, 1]]],
    ]


def test_hole_touching_the_outer_ring_at_a_corner() -> None:
    # A U whose tips touch diagonally: one polygon; the bay it closes is a hole touching the outer ring.
    mask = np.array(
        [
            [1, 1, 1, 1],
            [1, 0, 0, 1],
            [1, 0, 0, 1],
            [1, 1, 1, 0],
            [0, 0, 1, 1],
        ],
        bool,
    )
    mask[3, 3] = False
    mask[4, 3] = True
    coords = polygons(mask)
    check_exact(mask, coords)


def test_square_with_hole_and_island() -> None:
    mask = np.zeros((7, 7), bool)
    mask[1:6, 1:6] = True
    mask[2:5, 2:5] = False
    mask[3, 3] = True
    assert polygons(mask) == [
        [[[1, 1], [6, 1], [6, 6], [1, 6], [1, 1]], [[2, 2], [2, 5], [5, 5], [5, 2], [2, 2]]],
        [[[3, 3], [4, 3], [4, 4], [3, 4], [3, 3]]],
    ]


def test_simplification_bounds_the_error_and_drops_specks() -> None:
    yy, xx = np.ogrid[:200, :300]
    mask = (yy - 100) ** 2 / 80**2 + (xx - 150) ** 2 / 120**2 < 1
    mask[5, 5] = True  # a 1-pixel speck: no area left once simplified at 1 px
    exact = polygons(mask)
    simple = polygons(mask, 1.0)
    assert len(exact) == 2 and len(simple) == 1
    assert sum(len(r) for p in simple for r in p) < sum(len(r) for p in exact for r in p) / 4
    exact_shape = shape({"type": "MultiPolygon", "coordinates": [p for p in exact if len(p[0]) > 5]})
    simple_shape = shape({"type": "MultiPolygon", "coordinates": simple})
    # Douglas-Peucker keeps every dropped vertex within the tolerance of the simplified outline.
    assert exact_shape.hausdorff_distance(simple_shape) <= 1.0 + 1e-9
    assert abs(simple_shape.area - exact_shape.area) / exact_shape.area < 0.01


def test_vertex_cap() -> None:
    mask = (np.indices((40, 40)).sum(axis=0) % 2).astype(bool)  # a checkerboard: 800 specks
    count = outline_vertex_count(mask)
    assert count == 800 * 4
    with pytest.raises(PolygonTooComplex) as caught:
        polygons(mask, max_vertices=count - 1)
    assert caught.value.code == "polygon_too_complex" and caught.value.vertices == count
    assert len(polygons(mask, max_vertices=count)) == 800
    # Simplification may bring a mask under the cap (specks vanish at 1 px) ...
    assert polygons(mask, 1.0, max_vertices=count // 8) == []
    # ... unless its exact outline is beyond SIMPLIFY_WORK_FACTOR times the cap.
    with pytest.raises(PolygonTooComplex):
        polygons(mask, 1.0, max_vertices=count // 9)
    encoded = encode_segment(np.packbits(mask, axis=1), 40, rle=True, polygons=True, max_vertices=100)
    assert encoded.polygons is None and encoded.polygons_error is not None
    assert encoded.polygons_error.code == "polygon_too_complex"
    assert encoded.rle is not None and np.array_equal(decode_coco_rle(encoded.rle), mask)


def test_encode_segment_fits_the_result_contract() -> None:
    mask = np.zeros((20, 30), bool)
    mask[3:9, 4:20] = True
    encoded = encode_segment(np.packbits(mask, axis=1), 30, rle=True, polygons=True)
    segment = ResultSegment.model_validate(
        {
            "segment_id": 0,
            "mask_url": "/assets/j/mask_images/mask_000.png",
            "bbox": {"x": 4, "y": 3, "width": 16, "height": 6},
            "area": int(mask.sum()),
            "stability_score": 0.9,
            "predicted_iou": 0.9,
            "center_point": {"x": 12, "y": 6},
            "rle": encoded.rle,
            "polygons": encoded.polygons,
        }
    )
    data = segment.model_dump(mode="json", exclude_none=True)
    assert data["polygons"] == [[[[4, 3], [20, 3], [20, 9], [4, 9], [4, 3]]]]
    assert mask_utils.decode({**data["rle"], "counts": data["rle"]["counts"].encode()}).sum() == mask.sum()


# --- label map and overlay -------------------------------------------------------------------------------


def packed_file(tmp_path: Path, masks: list[np.ndarray]) -> PackedMasks:
    height, width = masks[0].shape
    path = tmp_path / "masks.npy"
    write_packed_masks(path, masks, len(masks), height, width)
    return PackedMasks(path, width)


def random_masks(rng: np.random.Generator, count: int, height: int, width: int) -> list[np.ndarray]:
    masks = []
    for _ in range(count):
        y0, x0 = rng.integers(0, height), rng.integers(0, width)
        h, w = rng.integers(1, height // 2 + 2), rng.integers(1, width // 2 + 2)
        mask = np.zeros((height, width), bool)
        mask[y0 : y0 + h, x0 : x0 + w] = rng.random((min(h, height - y0), min(w, width - x0))) < 0.8
        masks.append(mask)
    return masks


def test_label_map_follows_the_painting_rule(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    masks = random_masks(rng, 25, 37, 53)
    masks.append(masks[4].copy())  # equal areas: the higher id is painted later
    areas = [int(m.sum()) for m in masks]
    labels = label_map(packed_file(tmp_path, masks), areas)
    assert labels.dtype == np.uint16 and labels.shape == (37, 53)
    # The rule, pixel by pixel: among the segments covering a pixel, the smallest area wins; ties: highest id.
    for y in range(37):
        for x in range(53):
            covering = [i for i, m in enumerate(masks) if m[y, x]]
            expected = 0 if not covering else min(covering, key=lambda i: (areas[i], -i)) + 1
            assert labels[y, x] == expected
    assert paint_order([5, 9, 5, 1]) == [1, 0, 2, 3]
    png = encode_label_map_png(labels)
    with Image.open(io.BytesIO(png)) as image:
        assert image.format == "PNG" and image.mode in ("I;16", "I;16B", "I")
        assert np.array_equal(np.asarray(image).astype(np.uint16), labels)
    assert np.array_equal(decode_label_map_png(png), labels)


def test_label_map_values_above_255_survive_the_png() -> None:
    labels = np.arange(600 * 4, dtype=np.uint16).reshape(40, 60)
    assert np.array_equal(decode_label_map_png(encode_label_map_png(labels)), labels)


@pytest.mark.parametrize(("height", "width"), [(30, 40), (3000, 1000), (1000, 3001), (2048, 2048), (5, 4096)])
def test_overlay_dimensions(tmp_path: Path, height: int, width: int) -> None:
    rng = np.random.default_rng(height)
    masks = random_masks(rng, 3, height, width)
    image = rng.integers(0, 255, (height, width, 3), dtype=np.uint8)
    jpeg = overlay(image, packed_file(tmp_path, masks), [int(m.sum()) for m in masks])
    with Image.open(io.BytesIO(jpeg)) as decoded:
        assert decoded.format == "JPEG"
        assert decoded.size == overlay_size(width, height)
        assert max(decoded.size) <= 2048
        assert max(decoded.size) == min(2048, max(width, height))
        scale = max(decoded.size) / max(width, height)  # aspect kept: each side is the scaled side, rounded
        assert abs(decoded.size[0] - width * scale) <= 0.5 and abs(decoded.size[1] - height * scale) <= 0.5


def test_overlay_colours_segments(tmp_path: Path) -> None:
    mask = np.zeros((64, 64), bool)
    mask[16:48, 16:48] = True
    image = np.full((64, 64, 3), 128, np.uint8)
    jpeg = overlay(image, packed_file(tmp_path, [mask]), [int(mask.sum())])
    with Image.open(io.BytesIO(jpeg)) as decoded:
        pixels = np.asarray(decoded.convert("RGB")).astype(int)
    assert np.abs(pixels[4, 4] - 128).max() <= 3  # untouched outside
    assert np.abs(pixels[32, 32] - 128).max() > 30  # coloured inside


def test_overlay_refuses_a_mismatched_image(tmp_path: Path) -> None:
    mask = np.ones((10, 10), bool)
    with pytest.raises(ValueError, match="image is 12x10"):
        overlay(np.zeros((10, 12, 3), np.uint8), packed_file(tmp_path, [mask]), [100])
