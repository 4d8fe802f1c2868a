"""samseg.runtime.amg's pure helpers: the separable bilinear upsample, cell-level mask statistics against a
dense upsample, and the boundary fraction. Tensors only, no model: the generator's agreement with upstream
SAM-2 on a real (random-weight) model is tests/integration/test_amg_model.py.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from samseg.runtime.amg import bilinear_axis, boundary_fraction, cell_grid, cell_masks, dense_masks, paint_mask
from samseg.runtime.amg.geometry import box_nms, unpack_box


@pytest.mark.parametrize("out_hw", [(768, 1024), (96, 128), (300, 257), (1000, 1500)])
def test_bilinear_axis_matches_interpolate(out_hw: tuple[int, int]) -> None:
    low = torch.randn(1, 1, 256, 256)
    ref = F.interpolate(low, out_hw, mode="bilinear", align_corners=False)[0, 0]
    ys, xs = bilinear_axis(256, out_hw[0]), bilinear_axis(256, out_hw[1])
    l2 = low[0, 0]
    top = l2[ys.i0][:, xs.i0] * xs.w0 + l2[ys.i0][:, xs.i1] * xs.w1
    bot = l2[ys.i1][:, xs.i0] * xs.w0 + l2[ys.i1][:, xs.i1] * xs.w1
    ours = top * ys.w0[:, None] + bot * ys.w1[:, None]
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=0)  # kernel may fuse multiply-adds


def _logits(noisy: bool) -> torch.Tensor:
    torch.manual_seed(1)
    smooth = F.interpolate(torch.randn(5, 1, 12, 12) * 6, (256, 256), mode="bicubic", align_corners=False)[:, 0]
    smooth[0] = -3.0  # empty mask
    smooth[1] = 3.0  # full mask
    return smooth * 0.02 + torch.randn(5, 256, 256) * 0.1 if noisy else smooth  # noisy: like random weights


@pytest.mark.parametrize("noisy", [False, True])
@pytest.mark.parametrize("out_hw", [(384, 512), (96, 128), (300, 257)])
def test_cell_masks_match_dense_upsample(noisy: bool, out_hw: tuple[int, int]) -> None:
    from sam2.utils.amg import batched_mask_to_box

    low, thresholds = _logits(noisy), (-1.0, 0.0, 1.0)
    grid = cell_grid((256, 256), out_hw)
    cm = cell_masks(low, grid, thresholds, mask_idx=1)
    up = F.interpolate(low[:, None], out_hw, mode="bilinear", align_corners=False)[:, 0]
    counts = torch.stack([(up > t).sum((1, 2)) for t in thresholds], 1)
    assert (cm.counts - counts).abs().max() <= 2  # boundary pixels may round differently than the kernel
    binary = up > 0
    boxes = batched_mask_to_box(binary).long()
    assert (cm.boxes - boxes).abs().max() <= 1
    for k in range(len(low)):
        seg = paint_mask(cm.inside[k], cm.pos_flat[cm.pos_mask == k], grid)
        assert np.count_nonzero(seg != binary[k].numpy()) <= 2
    d_counts, d_boxes, d_packed = dense_masks(low, out_hw, thresholds, mask_idx=1)
    assert torch.equal(d_counts, counts) and torch.equal(d_boxes, boxes)
    x0, y0, x1, y1 = d_boxes[2].tolist()  # packed: the box crop only
    assert np.array_equal(unpack_box(d_packed[2], [x0, y0, x1, y1]), binary[2, y0 : y1 + 1, x0 : x1 + 1].numpy())


def test_boundary_fraction_separates_smooth_from_noisy() -> None:
    thresholds = (-1.0, 0.0, 1.0)
    smooth, noisy = boundary_fraction(_logits(False), thresholds), boundary_fraction(_logits(True), thresholds)
    assert smooth[0] == 0 and smooth[1] == 0
    assert float(smooth.max()) < 0.15 < float(noisy[2:].min())


# --- torchvision's NMS and image transforms, without importing torchvision in samseg (issue #18) ---------------
_boxes = st.lists(
    st.tuples(
        st.integers(0, 60), st.integers(0, 60), st.integers(0, 40), st.integers(0, 40), st.sampled_from([0.5, 0.9])
    ),
    max_size=40,
)


@settings(max_examples=150, deadline=None)
@given(raw=_boxes, threshold=st.sampled_from([0.0, 0.3, 0.5, 0.7, 1.0]), tie_seed=st.integers(0, 3))
def test_box_nms_keeps_what_torchvisions_batched_nms_keeps_in_its_order(
    raw: list[tuple[int, int, int, int, float]], threshold: float, tie_seed: int
) -> None:
    """Whole-pixel XYXY boxes as the generator makes them (empty ones included), scores with ties (few distinct
    values) or without: the same indices in the same order, for every box set Hypothesis tries."""
    from torchvision.ops.boxes import batched_nms

    boxes = torch.tensor([[x, y, x + w, y + h] for x, y, w, h, _ in raw], dtype=torch.float32).reshape(-1, 4)
    scores = torch.tensor([s for *_, s in raw], dtype=torch.float32)
    if tie_seed:  # distinct scores too (predicted IoUs rarely tie)
        scores = scores + torch.rand(len(scores), generator=torch.Generator().manual_seed(tie_seed)) * 0.01
    expected = batched_nms(boxes, scores, torch.zeros(len(scores)), threshold)
    assert torch.equal(box_nms(boxes, scores, threshold), expected)


@pytest.mark.parametrize("n", [999, 1000, 1001, 3000])  # batched_nms switches paths above 1000 boxes on CPU
def test_box_nms_agrees_on_both_sides_of_batched_nms_path_switch(n: int) -> None:
    from torchvision.ops.boxes import batched_nms

    gen = torch.Generator().manual_seed(n)
    xy = torch.randint(0, 900, (n, 2), generator=gen)
    wh = torch.randint(0, 300, (n, 2), generator=gen)
    boxes = torch.cat([xy, xy + wh], 1).to(torch.float32)
    scores = torch.randint(0, 50, (n,), generator=gen).to(torch.float32) / 50  # many ties
    for threshold in (0.5, 0.7):
        assert torch.equal(box_nms(boxes, scores, threshold), batched_nms(boxes, scores, torch.zeros(n), threshold))


@pytest.mark.parametrize("hw", [(768, 1024), (1024, 1024), (333, 517), (2048, 1536)])
def test_image_transform_equals_torchvisions_resize_and_normalize(hw: tuple[int, int]) -> None:
    from torchvision.transforms import Normalize, Resize

    from samseg.runtime.amg.generator import IMAGENET_MEAN, IMAGENET_STD, _image_transform

    image = np.random.default_rng(hw[0]).integers(0, 256, (*hw, 3), dtype=np.uint8)
    ours = _image_transform(1024)(image)
    x = torch.from_numpy(image).permute(2, 0, 1).to(torch.float32).div(255)
    expected = Normalize(IMAGENET_MEAN, IMAGENET_STD)(Resize((1024, 1024))(x))
    assert torch.equal(ours, expected)
