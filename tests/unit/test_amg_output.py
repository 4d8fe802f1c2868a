"""GeneratedMask builds full-resolution masks from the generator's compact form within the mask's box only;
the result equals the previous whole-frame path (paint_mask / the dense resize) bit for bit (issue #18)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from samseg.runtime.amg import cell_grid, cell_masks, dense_masks, paint_mask
from samseg.runtime.amg.decoder import Candidate
from samseg.runtime.amg.output import GeneratedMask, PaintContext

THRESHOLDS = (-1.0, 0.0, 1.0)


def _logits(noisy: bool) -> torch.Tensor:
    torch.manual_seed(1)
    smooth = F.interpolate(torch.randn(6, 1, 12, 12) * 6, (256, 256), mode="bicubic", align_corners=False)[:, 0]
    smooth[0] = -3.0  # empty mask
    smooth[1] = 3.0  # full mask
    smooth[2] = -3.0
    smooth[2, 100:110, 40:47] = 3.0  # a small blob: the box is a sliver of the frame
    return smooth * 0.02 + torch.randn(6, 256, 256) * 0.1 if noisy else smooth


def _context(grid_hw: tuple[int, int]) -> tuple[object, PaintContext]:
    grid = cell_grid((256, 256), grid_hw)
    ctx = PaintContext(grid_hw[0], grid_hw[1], grid.ys.i0.numpy(), grid.xs.i0.numpy(), (256, 256))
    return grid, ctx


def _candidate(packed: np.ndarray, pos: torch.Tensor | None, box: list[int]) -> Candidate:
    return Candidate(packed=packed, pos_flat=pos, box=box, area=0, stability=0.0, iou=0.0, point=[0.0, 0.0])


@pytest.mark.parametrize("noisy", [False, True])
@pytest.mark.parametrize("out_hw", [(384, 512), (96, 131), (300, 257)])
def test_cell_path_equals_whole_frame_paint(noisy: bool, out_hw: tuple[int, int]) -> None:
    grid, ctx = _context(out_hw)
    cm = cell_masks(_logits(noisy), grid, THRESHOLDS, mask_idx=1)  # type: ignore[arg-type]
    for k in range(len(cm.counts)):
        pos = cm.pos_flat[cm.pos_mask == k]
        mask = GeneratedMask(_candidate(np.packbits(cm.inside[k].numpy()), pos, cm.boxes[k].tolist()), ctx)
        expected = paint_mask(cm.inside[k], pos, grid)  # type: ignore[arg-type]
        assert np.array_equal(mask.dense(), expected)
        assert np.array_equal(mask.packed_rows(), np.packbits(expected, axis=1))


@pytest.mark.parametrize("noisy", [False, True])
@pytest.mark.parametrize("out_hw", [(384, 512), (96, 131)])
def test_dense_path_keeps_only_the_box_and_equals_the_resize(noisy: bool, out_hw: tuple[int, int]) -> None:
    low = _logits(noisy)
    _grid, ctx = _context(out_hw)
    counts, boxes, packed = dense_masks(low, out_hw, THRESHOLDS, mask_idx=1, chunk=4)
    binary = (F.interpolate(low[:, None], out_hw, mode="bilinear", align_corners=False)[:, 0] > 0).numpy()
    for k in range(len(low)):
        box = boxes[k].tolist()
        x0, y0, x1, y1 = box
        assert len(packed[k]) == ((y1 - y0 + 1) * (x1 - x0 + 1) + 7) // 8  # proportional to the box
        mask = GeneratedMask(_candidate(packed[k], None, box), ctx)
        assert np.array_equal(mask.dense(), binary[k])
        assert np.array_equal(mask.packed_rows(), np.packbits(binary[k], axis=1))
        assert int(counts[k, 1]) == int(binary[k].sum())
    if not noisy:
        assert len(packed[2]) < 64  # the 10x7-cell blob: a few bytes, not the frame's 24 kB
