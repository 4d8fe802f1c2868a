"""Full-resolution mask statistics from low-resolution logits: the bilinear-upscaling geometry at cell level.

Pure tensor helpers of samseg's AMG (see samseg.runtime.amg): a bilinear output pixel is a convex combination of
its low-res cell's four corners, so area, box and stability counts need interpolation only where a cell straddles
a threshold. No model code here.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

STABILITY_OFFSET = 1.0  # upstream's stability_score_offset default
MASK_THRESHOLD = 0.0  # upstream's mask_threshold default
# Above this boundary fraction a chunk's masks take the dense (upstream-like) full-resolution path.
DENSE_BOUNDARY_FRACTION = 0.15


@dataclass(frozen=True)
class AxisMap:
    """Bilinear source indices/weights for one output axis (PyTorch's align_corners=False rule)."""

    i0: Tensor  # int64 [out]
    i1: Tensor  # int64 [out]
    w0: Tensor  # float32 [out]
    w1: Tensor  # float32 [out]


def bilinear_axis(in_size: int, out_size: int, device: torch.device | str = "cpu") -> AxisMap:
    """Source indices and weights that `F.interpolate(mode="bilinear", align_corners=False)` uses.

    Computing them ourselves lets us interpolate only a sub-rectangle of the output with the same
    arithmetic as upstream's full-size resize.
    """
    scale = torch.tensor(in_size / out_size, dtype=torch.float32)
    dst = torch.arange(out_size, dtype=torch.float32)
    src = ((dst + 0.5) * scale - 0.5).clamp(min=0.0)
    i0 = src.floor().to(torch.int64).clamp(max=in_size - 1)
    lam = (src - i0.to(torch.float32)).clamp(0.0, 1.0)
    i1 = torch.where(i0 < in_size - 1, i0 + 1, i0)
    return AxisMap(i0.to(device), i1.to(device), (1.0 - lam).to(device), lam.to(device))


@dataclass(frozen=True)
class CellGrid:
    """How the output pixels of a bilinear upsample group into low-res cells.

    Output pixel (y, x) is a convex combination of the 2x2 low-res values of cell (i0[y], i0[x]), so a
    cell whose four corners lie on the same side of a threshold decides all its pixels without
    interpolating them; only cells straddling a threshold (the mask boundary) need real values.
    """

    ys: AxisMap
    xs: AxisMap
    ny: Tensor  # int64 [R]: output rows per cell row
    nx: Tensor  # int64 [C]
    y_start: Tensor  # int64 [R]: first output row of each cell row
    x_start: Tensor  # int64 [C]
    max_ny: int
    max_nx: int
    out_hw: tuple[int, int]


def cell_grid(low_hw: tuple[int, int], out_hw: tuple[int, int]) -> CellGrid:
    """Precompute the cell layout for upsampling `low_hw` logits to `out_hw` (once per image)."""
    ys, xs = bilinear_axis(low_hw[0], out_hw[0]), bilinear_axis(low_hw[1], out_hw[1])
    ny = torch.bincount(ys.i0, minlength=low_hw[0])
    nx = torch.bincount(xs.i0, minlength=low_hw[1])
    y_start = torch.cumsum(ny, 0) - ny
    x_start = torch.cumsum(nx, 0) - nx
    return CellGrid(ys, xs, ny, nx, y_start, x_start, int(ny.max()), int(nx.max()), out_hw)


@dataclass
class CellMasks:
    """Thresholded full-resolution statistics of a batch of low-res logit maps, without the full maps."""

    counts: Tensor  # int64 [m, len(thresholds)]: pixels strictly above each threshold
    boxes: Tensor  # int64 [m, 4] XYXY (inclusive) of pixels above the mask threshold; zeros if empty
    inside: Tensor  # bool [m, R, C]: cells wholly above the mask threshold
    pos_mask: Tensor  # int64 [P]: which mask each boundary pixel above the mask threshold belongs to
    pos_flat: Tensor  # int64 [P]: its flat index y * W + x


def cell_masks(low: Tensor, grid: CellGrid, thresholds: tuple[float, ...], mask_idx: int) -> CellMasks:
    """Upstream's `F.interpolate(low, out_hw, "bilinear") > t` statistics, evaluated at cell level.

    `thresholds` must be ascending; `mask_idx` selects the one defining the binary mask. Exact up to
    float rounding: boundary pixels use PyTorch's formula, other pixels are decided by their corners.
    """
    _m, rr, cc = low.shape
    r1 = torch.clamp(torch.arange(rr) + 1, max=rr - 1)
    c1 = torch.clamp(torch.arange(cc) + 1, max=cc - 1)
    right = low[:, :, c1]
    below, below_right = low[:, r1], right[:, r1]
    cmin = torch.minimum(torch.minimum(low, right), torch.minimum(below, below_right))
    cmax = torch.maximum(torch.maximum(low, right), torch.maximum(below, below_right))
    thr = torch.tensor(thresholds, dtype=low.dtype)
    band_min = (cmin[..., None] > thr).sum(-1, dtype=torch.int8)
    band_max = (cmax[..., None] > thr).sum(-1, dtype=torch.int8)
    real = (grid.ny[:, None] > 0) & (grid.nx[None, :] > 0)
    mixed = (band_min != band_max) & real
    settled = (band_min == band_max) & real
    weight = grid.ny[:, None] * grid.nx[None, :]
    counts = torch.stack([((settled & (band_min > k)) * weight).sum((1, 2)) for k in range(len(thresholds))], 1)
    inside = settled & (band_min > mask_idx)

    # Boundary pixels: real values, PyTorch's arithmetic order.
    mi, ci, cj = mixed.nonzero(as_tuple=True)
    ar_y, ar_x = torch.arange(grid.max_ny), torch.arange(grid.max_nx)
    oy = grid.y_start[ci, None] + ar_y  # [K, max_ny]
    ox = grid.x_start[cj, None] + ar_x
    valid = (ar_y < grid.ny[ci, None])[:, :, None] & (ar_x < grid.nx[cj, None])[:, None, :]
    h, w = grid.out_hw
    oy, ox = oy.clamp(max=h - 1), ox.clamp(max=w - 1)
    ys, xs = grid.ys, grid.xs
    y0, y1 = ys.i0[oy][:, :, None], ys.i1[oy][:, :, None]
    x0, x1 = xs.i0[ox][:, None, :], xs.i1[ox][:, None, :]
    wx0, wx1 = xs.w0[ox][:, None, :], xs.w1[ox][:, None, :]
    mm = mi[:, None, None]
    top = low[mm, y0, x0] * wx0 + low[mm, y0, x1] * wx1
    bot = low[mm, y1, x0] * wx0 + low[mm, y1, x1] * wx1
    val = top * ys.w0[oy][:, :, None] + bot * ys.w1[oy][:, :, None]
    for k, t in enumerate(thresholds):
        per_cell = ((val > t) & valid).sum((1, 2))
        counts[:, k].index_add_(0, mi, per_cell)

    # Boxes: settled-inside cells give whole row/column ranges, boundary pixels their own coordinates.
    big = h + w + 1
    pos = (val > thresholds[mask_idx]) & valid
    row_any, col_any = pos.any(2), pos.any(1)  # [K, max_ny], [K, max_nx]
    y_lo = torch.where(row_any, oy, big).amin(1)
    y_hi = torch.where(row_any, oy, -1).amax(1)
    x_lo = torch.where(col_any, ox, big).amin(1)
    x_hi = torch.where(col_any, ox, -1).amax(1)
    in_rows, in_cols = inside.any(2), inside.any(1)  # [m, R], [m, C]
    ry_lo = torch.where(in_rows, grid.y_start, big).amin(1)
    ry_hi = torch.where(in_rows, grid.y_start + grid.ny - 1, -1).amax(1)
    cx_lo = torch.where(in_cols, grid.x_start, big).amin(1)
    cx_hi = torch.where(in_cols, grid.x_start + grid.nx - 1, -1).amax(1)
    ry_lo = ry_lo.scatter_reduce(0, mi, y_lo, "amin")
    ry_hi = ry_hi.scatter_reduce(0, mi, y_hi, "amax")
    cx_lo = cx_lo.scatter_reduce(0, mi, x_lo, "amin")
    cx_hi = cx_hi.scatter_reduce(0, mi, x_hi, "amax")
    boxes = torch.stack([cx_lo, ry_lo, cx_hi, ry_hi], 1)
    boxes = torch.where((ry_hi >= 0)[:, None], boxes, 0)

    kk, a, b = pos.nonzero(as_tuple=True)
    return CellMasks(counts, boxes, inside, mi[kk], oy[kk, a] * w + ox[kk, b])


def boundary_fraction(low: Tensor, thresholds: tuple[float, ...]) -> Tensor:
    """Per map, the fraction of low-res cells whose corners straddle a threshold.

    Smooth logits (trained weights) have a thin boundary and `cell_masks` is cheap; noisy logits
    (random weights) are all boundary and the dense upsample of `dense_masks` is faster.
    """
    lo = torch.minimum(low[:, :-1], low[:, 1:])
    hi = torch.maximum(low[:, :-1], low[:, 1:])
    frac = torch.zeros(low.shape[0])
    for t in thresholds:
        frac = torch.maximum(frac, ((lo <= t) & (hi > t)).float().mean((1, 2)))
    return frac


def dense_masks(
    low: Tensor, out_hw: tuple[int, int], thresholds: tuple[float, ...], mask_idx: int, chunk: int = 4
) -> tuple[Tensor, Tensor, list[np.ndarray]]:
    """Upstream's path (one full-size bilinear resize), in small chunks: counts, boxes, packed masks.

    Each packed mask holds only its box (`np.packbits` of `mask[y0:y1+1, x0:x1+1]`, flattened; see
    `unpack_box`), so what is kept until NMS is proportional to the mask, not to the frame.
    """
    from sam2.utils.amg import batched_mask_to_box

    counts: list[Tensor] = []
    boxes: list[Tensor] = []
    packed: list[np.ndarray] = []
    for part in torch.split(low, chunk):
        up = F.interpolate(part[:, None], out_hw, mode="bilinear", align_corners=False)[:, 0]
        counts.append(torch.stack([(up > t).sum((1, 2)) for t in thresholds], 1).cpu())
        binary = up > thresholds[mask_idx]
        del up
        box = batched_mask_to_box(binary).long().cpu()
        boxes.append(box)
        binary_np = binary.cpu().numpy()
        for k, (x0, y0, x1, y1) in enumerate(box.tolist()):
            packed.append(np.packbits(binary_np[k, y0 : y1 + 1, x0 : x1 + 1]))
    if not counts:
        return torch.zeros(0, len(thresholds), dtype=torch.int64), torch.zeros(0, 4, dtype=torch.int64), []
    return torch.cat(counts), torch.cat(boxes), packed


def paint_mask(inside: Tensor, pos_flat: Tensor, grid: CellGrid) -> np.ndarray:
    """Full-resolution bool mask from one mask's inside cells and boundary pixels above threshold."""
    seg = inside[grid.ys.i0][:, grid.xs.i0].numpy().copy()
    seg.reshape(-1)[pos_flat.numpy()] = True
    return seg


def dense_chunk(out_hw: tuple[int, int], on_device: bool) -> int:
    """Masks per full-size resize in `dense_masks`: ~64 MB of float32 logits per chunk on CPU (4 at 1024x768,
    1 at 40 MP), so the transient memory of the dense path does not grow with the image."""
    if on_device:
        return 16
    return max(1, min(4, (1 << 24) // max(1, out_hw[0] * out_hw[1])))


def unpack_box(packed: np.ndarray, box: list[int]) -> np.ndarray:
    """The bool [y1-y0+1, x1-x0+1] crop that `dense_masks` packed for an XYXY (inclusive) box."""
    x0, y0, x1, y1 = box
    bh, bw = y1 - y0 + 1, x1 - x0 + 1
    return np.unpackbits(packed, count=bh * bw).view(bool).reshape(bh, bw)


def paint_rows(
    out: np.ndarray, box: list[int], inside: np.ndarray | None, packed_box: np.ndarray | None,
    pos_flat: np.ndarray | None, y_cell: np.ndarray, x_cell: np.ndarray, width: int,
) -> None:  # fmt: skip
    """Fill `out` (bool [y1-y0+1, W], zeros: rows y0..y1 of the mask) from a mask's compact form.

    Work is proportional to the mask's box, not to the frame: cells are expanded only inside the box and
    boundary pixels (`pos_flat`, flat y * W + x, all inside the box) are set one by one. `y_cell`/`x_cell`
    are the low-res cell of each output row/column (CellGrid.ys.i0 / xs.i0 as numpy).
    """
    x0, y0, x1, y1 = box
    if packed_box is not None:
        out[:, x0 : x1 + 1] = unpack_box(packed_box, box)
        return
    assert inside is not None and pos_flat is not None
    out[:, x0 : x1 + 1] = inside[y_cell[y0 : y1 + 1]][:, x_cell[x0 : x1 + 1]]
    if len(pos_flat):
        out.reshape(-1)[pos_flat - y0 * width] = True


def box_nms(boxes: Tensor, scores: Tensor, iou_threshold: float) -> Tensor:
    """torchvision.ops.batched_nms(boxes, scores, zeros, iou_threshold) — one category — in torch alone.

    Upstream's generator runs torchvision's; importing torchvision costs every `samseg segment` ~1.7 s, more
    than this whole step. Same answer by construction: the kernel's descending sort (stable: tied scores in
    index order), the same float32 IoU arithmetic in the same order (boxes here are whole pixels),
    suppression when IoU > threshold compared in float64 as the C++ kernel does, and batched_nms's own output
    order (above 1000 boxes it re-sorts the kept indices by score). Greedy, one kept box at a time against
    all boxes: O(kept x n) elementwise work, no n x n matrix. Returns int64 indices, best score first.
    """
    n = len(scores)
    if n == 0:
        return torch.zeros(0, dtype=torch.int64)
    order = torch.sort(scores, descending=True, stable=True)[1]  # the kernel's order: ties by index
    x1, y1, x2, y2 = (boxes[:, k].contiguous().numpy() for k in range(4))
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])  # as the kernel: one ATen multiply
    area = areas.numpy()
    suppressed = np.zeros(n, dtype=bool)
    keep: list[int] = []
    zero = np.float32(0)
    with np.errstate(divide="ignore", invalid="ignore"):  # two empty boxes: 0 / 0 = NaN, never suppressed
        for i in order.tolist():
            if suppressed[i]:
                continue
            keep.append(i)
            w = np.maximum(zero, np.minimum(x2[i], x2) - np.maximum(x1[i], x1))
            h = np.maximum(zero, np.minimum(y2[i], y2) - np.maximum(y1[i], y1))
            inter = w * h
            overlap = inter / (area[i] + area - inter)
            suppressed |= overlap.astype(np.float64) > iou_threshold
    kept = torch.tensor(keep, dtype=torch.int64)
    if boxes.numel() > 4000:  # batched_nms's per-category path on CPU: kept indices ascending, re-sorted
        ascending = torch.sort(kept)[0]
        return ascending[scores[ascending].sort(descending=True)[1]]
    return kept
