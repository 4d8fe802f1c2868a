"""samseg.runtime.amg's pure helpers: the separable bilinear upsample, cell-level mask statistics against a
dense upsample, and the boundary fraction. Tensors only, no model: the generator's agreement with upstream
SAM-2 on a real (random-weight) model is tests/integration/test_amg_model.py.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from samseg.runtime.amg import bilinear_axis, boundary_fraction, cell_grid, cell_masks, dense_masks, paint_mask
from samseg.runtime.amg.geometry import unpack_box


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
