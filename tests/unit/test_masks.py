"""samseg.core.masks: geometry measured on the mask, 1-bit PNG encoding, packed hand-off form, parallel writer."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from samseg.core.masks import (
    MaskGeometry,
    decode_png,
    encode_png,
    mask_filename,
    mask_geometry,
    pack_masks,
    unpack_masks,
    write_mask_pngs,
)


def expected_geometry(mask: np.ndarray) -> tuple[int, int, int, int, int] | None:
    """The tight bbox computed independently from the coordinates of the set pixels."""
    ys, xs = np.nonzero(mask)
    if xs.size == 0:
        return None
    x0, x1, y0, y1 = int(xs.min()), int(xs.max()), int(ys.min()), int(ys.max())
    return x0, y0, x1 - x0 + 1, y1 - y0 + 1, int(xs.size)


def as_tuple(geometry: MaskGeometry | None) -> tuple[int, int, int, int, int] | None:
    if geometry is None:
        return None
    return geometry.x, geometry.y, geometry.width, geometry.height, geometry.area


# --- mask_geometry ------------------------------------------------------------------------------------


def test_rectangle_matches_contract_example():
    # Contract example: bbox x=120, y=150, width=80, height=60 has its centre at (160, 180).
    mask = np.zeros((400, 500), dtype=bool)
    mask[150:210, 120:200] = True
    geometry = mask_geometry(mask)
    assert geometry is not None
    assert (geometry.x, geometry.y, geometry.width, geometry.height) == (120, 150, 80, 60)
    assert geometry.area == 80 * 60
    assert geometry.center == (160, 180)


def test_single_pixel():
    mask = np.zeros((9, 11), dtype=bool)
    mask[4, 7] = True
    geometry = mask_geometry(mask)
    assert as_tuple(geometry) == (7, 4, 1, 1, 1)
    assert geometry is not None and geometry.center == (7, 4)


@pytest.mark.parametrize("shape", [(1, 1), (5, 3), (64, 64)])
def test_empty_mask_has_no_geometry(shape):
    assert mask_geometry(np.zeros(shape, dtype=bool)) is None


def test_l_shape_bbox_covers_both_arms_but_area_counts_pixels():
    mask = np.zeros((30, 40), dtype=bool)
    mask[5:25, 3:6] = True  # vertical arm: 20 rows x 3 cols
    mask[22:25, 3:30] = True  # horizontal arm along the bottom
    geometry = mask_geometry(mask)
    assert as_tuple(geometry) == expected_geometry(mask)
    assert geometry is not None
    assert (geometry.x, geometry.y, geometry.width, geometry.height) == (3, 5, 27, 20)
    assert geometry.area == int(mask.sum()) < geometry.width * geometry.height


def test_mask_touching_every_edge():
    mask = np.zeros((17, 23), dtype=bool)
    mask[0, 5] = True  # top edge
    mask[16, 9] = True  # bottom edge
    mask[8, 0] = True  # left edge
    mask[3, 22] = True  # right edge
    geometry = mask_geometry(mask)
    assert as_tuple(geometry) == (0, 0, 23, 17, 4)
    assert geometry is not None and geometry.center == (0 + 23 // 2, 0 + 17 // 2)


def test_full_mask_of_odd_size():
    mask = np.ones((7, 13), dtype=bool)
    geometry = mask_geometry(mask)
    assert as_tuple(geometry) == (0, 0, 13, 7, 91)
    assert geometry is not None and geometry.center == (6, 3)


@pytest.mark.parametrize("shape", [(1, 1), (1, 9), (9, 1), (7, 13), (97, 131), (128, 96)])
def test_random_masks_match_nonzero_bbox(shape):
    rng = np.random.default_rng(sum(shape))
    for density in (0.002, 0.05, 0.5):
        mask = rng.random(shape) < density
        geometry = mask_geometry(mask)
        assert as_tuple(geometry) == expected_geometry(mask)
        if geometry is not None:
            x, y, w, h, _ = expected_geometry(mask)  # type: ignore[misc]
            assert geometry.center == (x + w // 2, y + h // 2)
            # Every set pixel lies inside the bbox.
            assert mask[y : y + h, x : x + w].sum() == mask.sum()


def test_center_floors_for_even_and_odd_extents():
    mask = np.zeros((20, 20), dtype=bool)
    mask[2:5, 10:14] = True  # width 4, height 3
    geometry = mask_geometry(mask)
    assert geometry is not None
    assert geometry.center == (10 + 4 // 2, 2 + 3 // 2) == (12, 3)


def test_geometry_of_non_contiguous_view():
    base = np.zeros((40, 50), dtype=bool)
    base[10:20, 30:45] = True
    view = base.T  # a transposed (non C-contiguous) view: x and y swap
    assert as_tuple(mask_geometry(view)) == (10, 30, 10, 15, 150) == expected_geometry(view)


# --- PNG encoding -------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(1, 1), (7, 13), (13, 7), (97, 131), (3, 8), (5, 9), (2, 17)])
def test_png_round_trip_of_random_masks(shape):
    height, width = shape
    rng = np.random.default_rng(height * 1000 + width)
    mask = rng.random(shape) < 0.4
    data = encode_png(mask)
    assert data.startswith(b"\x89PNG\r\n\x1a\n")
    with Image.open(io.BytesIO(data)) as image:
        assert image.format == "PNG"
        assert image.mode == "1"
        assert image.size == (width, height)
        # White (255) is inside, independently of decode_png.
        pixels = np.asarray(image.convert("L"))
    assert set(np.unique(pixels)) <= {0, 255}
    np.testing.assert_array_equal(pixels == 255, mask)
    decoded = decode_png(data)
    assert decoded.dtype == np.bool_
    assert decoded.shape == shape
    np.testing.assert_array_equal(decoded, mask)


@pytest.mark.parametrize("fill", [False, True])
def test_png_round_trip_of_uniform_masks(fill):
    mask = np.full((11, 29), fill, dtype=bool)
    np.testing.assert_array_equal(decode_png(encode_png(mask)), mask)


def test_png_of_a_mask_is_small():
    mask = np.zeros((1024, 1024), dtype=bool)
    mask[100:600, 200:900] = True
    data = encode_png(mask)
    # A 1-bit PNG of one rectangle is a tiny fraction of the 1 MiB bool array (and of its 128 KiB bitmap).
    assert len(data) < 16 * 1024


# --- packed hand-off form -----------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(1, 1, 1), (3, 7, 13), (2, 5, 8), (4, 97, 131), (0, 6, 9)])
def test_pack_unpack_round_trip(shape):
    n, height, width = shape
    rng = np.random.default_rng(n + height + width)
    masks = rng.random(shape) < 0.5
    packed = pack_masks(masks)
    assert packed.dtype == np.uint8
    assert packed.shape == (n, height, -(-width // 8))
    unpacked = unpack_masks(packed, width)
    assert unpacked.dtype == np.bool_
    assert unpacked.shape == shape
    np.testing.assert_array_equal(unpacked, masks)


def test_pack_survives_a_save_load_cycle(tmp_path):
    rng = np.random.default_rng(7)
    masks = rng.random((5, 33, 47)) < 0.3
    np.save(tmp_path / "masks.npy", pack_masks(masks))
    np.testing.assert_array_equal(unpack_masks(np.load(tmp_path / "masks.npy"), 47), masks)


# --- write_mask_pngs ----------------------------------------------------------------------------------


def test_mask_filename_is_zero_padded():
    assert [mask_filename(i) for i in (0, 7, 42, 999, 1000)] == [
        "mask_000.png",
        "mask_007.png",
        "mask_042.png",
        "mask_999.png",
        "mask_1000.png",
    ]


@pytest.mark.parametrize("count", [0, 1, 3, 8, 21])
def test_write_mask_pngs_in_order_with_matching_content(tmp_path, count):
    rng = np.random.default_rng(count)
    # Each mask is distinguishable: mask i has exactly i + 1 pixels set in its first row, plus noise below.
    masks = rng.random((count, 19, 37)) < 0.3
    masks[:, 0, :] = False
    for i in range(count):
        masks[i, 0, : i + 1] = True
    out_dir = tmp_path / "nested" / "mask_images"  # created on demand
    paths = write_mask_pngs(masks, out_dir)
    assert out_dir.is_dir()
    assert [p.name for p in paths] == [f"mask_{i:03d}.png" for i in range(count)]
    assert all(p.parent == out_dir for p in paths)
    assert sorted(p.name for p in out_dir.iterdir()) == [p.name for p in paths]
    for i, path in enumerate(paths):
        decoded = decode_png(path.read_bytes())
        np.testing.assert_array_equal(decoded, masks[i])
        assert int(decoded[0].sum()) == i + 1


def test_write_mask_pngs_accepts_a_list_of_different_sizes(tmp_path):
    masks = [np.eye(5, dtype=bool), np.ones((2, 9), dtype=bool), np.zeros((4, 4), dtype=bool)]
    paths = write_mask_pngs(masks, tmp_path)
    for mask, path in zip(masks, paths, strict=True):
        np.testing.assert_array_equal(decode_png(path.read_bytes()), mask)


# --- bit-packed masks: geometry, PNGs and the .npy hand-off without unpacking ---------------------------------
@pytest.mark.parametrize("shape", [(1, 1), (7, 9), (16, 8), (33, 65), (5, 1000)])
def test_packed_geometry_and_png_match_the_unpacked_ones(shape):
    from samseg.core.masks import encode_packed_png, packed_geometry

    rng = np.random.default_rng(shape[0] * 1000 + shape[1])
    for density in (0.0, 0.01, 0.5, 1.0):
        mask = rng.random(shape) < density
        packed = np.packbits(mask, axis=1)
        assert packed_geometry(packed, shape[1]) == mask_geometry(mask)
        np.testing.assert_array_equal(decode_png(encode_packed_png(packed, shape[1])), mask)


def test_packed_masks_file_reads_one_mask_at_a_time_and_checks_its_shape(tmp_path):
    from samseg.core.masks import PackedMasks, write_packed_masks

    rng = np.random.default_rng(3)
    masks = [rng.random((13, 21)) > 0.5 for _ in range(5)]
    write_packed_masks(tmp_path / "m.npy", masks, 5, 13, 21)
    packed = PackedMasks(tmp_path / "m.npy", 21)
    assert len(packed) == 5
    for index, mask in enumerate(masks):
        np.testing.assert_array_equal(np.unpackbits(packed.read(index), axis=1, count=21).astype(bool), mask)
    np.testing.assert_array_equal(np.load(tmp_path / "m.npy"), np.packbits(np.stack(masks), axis=-1))  # plain .npy
    with pytest.raises(ValueError, match="width"):
        PackedMasks(tmp_path / "m.npy", 40)
    with pytest.raises(ValueError, match="expected"):
        write_packed_masks(tmp_path / "bad.npy", [np.zeros((2, 2), bool)], 1, 3, 3)
    with pytest.raises(ValueError, match="announced"):
        write_packed_masks(tmp_path / "short.npy", masks[:2], 3, 13, 21)
