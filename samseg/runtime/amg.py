"""samseg's automatic mask generator: upstream SAM-2 AMG records, computed with far less work.

`sam2.automatic_mask_generator.SAM2AutomaticMaskGenerator` (sam2 1.1.0) spends its time in three
places: the mask decoder runs every prompt against all 64x64 image tokens (ten 4096x256x128
projections per prompt, three of which do not depend on the prompt at all), every candidate is
upsampled to full resolution before the predicted-IoU filter can drop it, and each batch is
RLE-encoded only to be decoded again for binary output. This module keeps upstream's maths and
changes the order of work:

Exact (equal up to float rounding, always on):
  * image-side work that does not depend on the prompt (dense positional encoding, image
    embedding + no-mask embedding, the layer-0 k/v/q projections of the image tokens) is done once
    per image instead of once per prompt;
  * every other attention over the 4096 image tokens is re-associated so that the prompt's few
    tokens are projected into the 256-d image space instead of projecting 4096 image tokens into
    the 128-d head space ((x W^T) k^T == x (W^T k^T), P (x W^T + b) == (P x) W^T + b), and the
    image->token output projection, bias and residual fold into one bmm; the softmax over the
    8 prompt tokens is laid out so it vectorises over the 4096 image tokens;
  * prompts run in chunks of 16 on CPU (4 MB of activations per prompt; ~2x faster than 64);
  * the upscaling runs channels-last (oneDNN's transposed convolutions ~3x faster than NCHW);
    only the three multimask outputs that upstream AMG uses (multimask_output=True, so the
    decoder's dynamic_multimask_via_stability never applies) get a hypernetwork product;
  * the predicted-IoU filter runs on the decoder's IoU head *before* mask upscaling, so prompts
    whose three masks all fail skip the upscaling and everything after;
  * full-resolution statistics (area, box, stability counts at -1/0/+1) come from the 256x256
    logits at cell level: a bilinear output pixel is a convex combination of its cell's four
    corners, so only cells straddling a threshold (the mask boundary) are interpolated, with
    PyTorch's formula; noisy logits (mostly boundary, e.g. random weights) and CUDA take the dense
    path, one F.interpolate per small chunk exactly as upstream;
  * box NMS runs before any full-size mask is materialised; survivors are painted straight into
    bool arrays (no RLE encode/decode round trip), candidates are kept bit-packed meanwhile.
  SAM-2 already upsamples the 256x256 logits to the original size in one bilinear resize (SAM-1
  used two), so there is no second resize to remove or approximate.

Approximate (constructor flags, each measured in benchmarks/amg.py against upstream):
  * `int8`: dynamic int8 quantisation (CPU only, float32 only) of the decoder's token-side Linear
    layers and of the upscaling transposed convolutions rewritten as per-pixel Linear layers;
  * `compile`: torch.compile (inductor) of the per-chunk transformer with a fixed chunk shape; the
    compile is paid once in the constructor on a dummy input (tens of seconds on CPU; inductor's
    on-disk cache makes later processes faster), so construct the generator once per process;
  * `half`: autocast (CUDA float16, CPU bfloat16) for the image encoder and the decoder; on CUDA
    all points go in one batch;
  * `prune`: skip grid points that fall in low-res cells inside masks already accepted by earlier
    batches (off by default: it changes which prompts run, so the mask set differs).

Only upstream's default single-crop path (crop_n_layers=0) is implemented; multi-crop (crop_n_layers
> 0), use_m2m and the RLE output modes remain upstream-only. With min_mask_region_area > 0 the
low-resolution hole/sprinkle filling is delegated to upstream's `SAM2Transforms` exactly as
`SAM2ImagePredictor` does (it needs sam2's CUDA extension and is skipped with a warning without it).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

if TYPE_CHECKING:
    from sam2.modeling.sam2_base import SAM2Base

__all__ = ["CellGrid", "CellMasks", "FastMaskGenerator", "bilinear_axis", "cell_grid", "cell_masks", "paint_mask"]

_STABILITY_OFFSET = 1.0  # upstream's stability_score_offset default
_MASK_THRESHOLD = 0.0  # upstream's mask_threshold default
# Above this boundary fraction a chunk's masks take the dense (upstream-like) full-resolution path.
_DENSE_BOUNDARY_FRACTION = 0.15


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
    """Upstream's path (one full-size bilinear resize), in small chunks: counts, boxes, packed masks."""
    from sam2.utils.amg import batched_mask_to_box

    counts: list[Tensor] = []
    boxes: list[Tensor] = []
    packed: list[np.ndarray] = []
    for part in torch.split(low, chunk):
        up = F.interpolate(part[:, None], out_hw, mode="bilinear", align_corners=False)[:, 0]
        counts.append(torch.stack([(up > t).sum((1, 2)) for t in thresholds], 1).cpu())
        binary = up > thresholds[mask_idx]
        boxes.append(batched_mask_to_box(binary).long().cpu())
        flat = binary.cpu().numpy().reshape(len(part), -1)
        packed.extend(np.packbits(flat, axis=1))
    if not counts:
        return torch.zeros(0, len(thresholds), dtype=torch.int64), torch.zeros(0, 4, dtype=torch.int64), []
    return torch.cat(counts), torch.cat(boxes), packed


def paint_mask(inside: Tensor, pos_flat: Tensor, grid: CellGrid) -> np.ndarray:
    """Full-resolution bool mask from one mask's inside cells and boundary pixels above threshold."""
    seg = inside[grid.ys.i0][:, grid.xs.i0].numpy().copy()
    seg.reshape(-1)[pos_flat.numpy()] = True
    return seg


def _fresh(x: Tensor) -> Tensor:
    """A contiguous copy with canonical strides (size-1 dims included), so torch.compile guards hold."""
    return x.clone(memory_format=torch.contiguous_format)


def _heads(x: Tensor, num_heads: int) -> Tensor:
    b, n, c = x.shape
    return x.reshape(b, n, num_heads, c // num_heads).transpose(1, 2)  # [B, H, N, d]


def _merge_heads(x: Tensor) -> Tensor:
    b, h, n, d = x.shape
    return x.transpose(1, 2).reshape(b, n, h * d)


def _linear_weight(layer: Any) -> tuple[Tensor, Tensor]:
    """Float weight and bias of a Linear (or a dynamically quantised Linear)."""
    weight = layer.weight
    if callable(weight):  # torch.ao dynamic quantised Linear exposes weight() / bias()
        return weight().dequantize(), layer.bias()
    return weight, layer.bias


def _quantize(module: nn.Module) -> Any:
    """Dynamic int8 quantisation of a module's Linear layers (CPU kernels: fbgemm / onednn)."""
    from torch.ao.quantization import quantize_dynamic

    return quantize_dynamic(module, {nn.Linear}, torch.qint8)  # type: ignore[no-untyped-call]


class _ConvT2x2(nn.Module):
    """A stride-2, kernel-2 ConvTranspose2d on NHWC tensors.

    Float: the original module on a channels-last view (oneDNN's fast path, no copies). int8: the same
    maths as a per-pixel Linear (the kernels do not overlap) plus a pixel shuffle, so that dynamic
    int8 quantisation can reach the decoder's heaviest per-prompt layers.
    """

    def __init__(self, conv: nn.ConvTranspose2d, int8: bool) -> None:
        super().__init__()
        cin, cout = conv.in_channels, conv.out_channels
        self.cout = cout
        self.conv: nn.Module | None = None
        self.linear: nn.Module | None = None
        if not int8:
            self.conv = conv
            return
        linear = nn.Linear(cin, cout * 4)
        with torch.no_grad():
            # weight [cin, cout, ky, kx] -> output features ordered (ky, kx, cout)
            linear.weight.copy_(conv.weight.detach().permute(2, 3, 1, 0).reshape(cout * 4, cin))
            bias = conv.bias if conv.bias is not None else torch.zeros(cout)
            linear.bias.copy_(bias.detach().repeat(4))
        self.linear = _quantize(nn.Sequential(linear))

    def forward(self, x: Tensor) -> Tensor:
        if self.conv is not None:
            out: Tensor = self.conv(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
            return out
        assert self.linear is not None
        b, h, w, _ = x.shape
        y: Tensor = self.linear(x).reshape(b, h, w, 2, 2, self.cout).permute(0, 1, 3, 2, 4, 5)
        return y.reshape(b, 2 * h, 2 * w, self.cout)


@dataclass
class _ImageState:
    """Per-image, prompt-independent decoder inputs."""

    keys0: Tensor  # [1, N, C] image embedding + no-mask embedding, flattened
    pe: Tensor  # [1, N, C] dense positional encoding
    k0: Tensor  # [1, H, N, d] layer-0 token->image keys
    v0: Tensor  # [1, H, N, d] layer-0 token->image values
    q0: Tensor  # [1, H, N, d] layer-0 image->token queries
    high_res: list[Tensor]  # NHWC [feat_s0, feat_s1] (already through conv_s0/conv_s1)
    hw: tuple[int, int]  # embedding grid


@dataclass
class _Frame:
    """Everything generate() shares between chunks of one image."""

    st: _ImageState
    points: Tensor  # [P, 2] float32 grid points in image pixels (as upstream reports them)
    in_points: Tensor  # [P, 2] the same in the model's 1024-px input frame
    grid: CellGrid
    covered: Tensor | None  # pruning: low-res cells inside accepted masks


@dataclass
class _Candidate:
    """A mask that passed the per-batch filters, kept compact (~10 kB) until NMS decides."""

    packed: np.ndarray  # packbits of the [R, C] cells wholly inside the mask, or of the full mask
    pos_flat: Tensor | None  # flat indices of boundary pixels inside the mask; None: `packed` is full
    box: list[int]  # XYXY, inclusive, as batched_mask_to_box
    area: int
    stability: float
    iou: float
    point: list[float]


class _Decoder(nn.Module):
    """SAM-2 MaskDecoder + TwoWayTransformer, re-associated around the prompt-independent image side."""

    def __init__(self, model: SAM2Base, int8: bool) -> None:
        super().__init__()
        dec = model.sam_mask_decoder
        self.prompt_encoder: Any = model.sam_prompt_encoder
        self.transformer: Any = dec.transformer
        self.s = 1 if dec.pred_obj_scores else 0
        if dec.pred_obj_scores:
            tokens = [dec.obj_score_token.weight, dec.iou_token.weight, dec.mask_tokens.weight]
        else:
            tokens = [dec.iou_token.weight, dec.mask_tokens.weight]
        self.output_tokens: Tensor = torch.cat(tokens, dim=0).detach().clone()
        self.num_mask_tokens: int = dec.num_mask_tokens
        self.iou_head: Any = dec.iou_prediction_head
        self.hyper: Any = dec.output_hypernetworks_mlps
        self.use_high_res = bool(dec.use_high_res_features)
        dc1, ln1, act1, dc2, act2 = dec.output_upscaling
        self.dc1, self.dc2 = _ConvT2x2(dc1, int8), _ConvT2x2(dc2, int8)
        self.ln1: Any = ln1
        self.act1: Any = act1
        self.act2: Any = act2
        if int8:
            # Quantise a private copy of the token-side / upscaling Linear layers; the image-side
            # matmuls below use dequantised weights because they are per-prompt bmm's.
            import copy

            self.transformer = _quantize(copy.deepcopy(self.transformer))
            self.iou_head = _quantize(copy.deepcopy(self.iou_head))
            self.hyper = _quantize(copy.deepcopy(self.hyper))

    # ---- per image -------------------------------------------------------------------------------
    def image_state(self, image_embed: Tensor, high_res: list[Tensor]) -> _ImageState:
        pe_grid = self.prompt_encoder.get_dense_pe()  # [1, C, h, w]
        no_mask = self.prompt_encoder.no_mask_embed.weight.reshape(1, -1, 1, 1)
        src = image_embed + no_mask
        _, _, h, w = src.shape
        keys0 = src.flatten(2).transpose(1, 2).contiguous()
        pe = pe_grid.flatten(2).transpose(1, 2).contiguous().to(keys0.dtype)
        layer0 = self.transformer.layers[0]
        t2i, i2t = layer0.cross_attn_token_to_image, layer0.cross_attn_image_to_token
        kpe = keys0 + pe
        return _ImageState(
            keys0=_fresh(keys0),
            pe=_fresh(pe),
            k0=_fresh(_heads(t2i.k_proj(kpe), t2i.num_heads)),
            v0=_fresh(_heads(t2i.v_proj(keys0), t2i.num_heads)),
            q0=_fresh(_heads(i2t.q_proj(kpe), i2t.num_heads)),
            high_res=[f.permute(0, 2, 3, 1).contiguous() for f in high_res],
            hw=(h, w),
        )

    # ---- attention variants ----------------------------------------------------------------------
    @staticmethod
    def _tok2img_pre(attn: Any, q_in: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """Tokens attend to the image with precomputed (prompt-independent) image keys/values."""
        q = _heads(attn.q_proj(q_in), attn.num_heads)
        p = torch.softmax(torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(q.shape[-1]), dim=-1)
        out: Tensor = attn.out_proj(_merge_heads(torch.matmul(p, v)))
        return out

    @staticmethod
    def _tok2img(attn: Any, q_in: Tensor, xk: Tensor, xv: Tensor) -> Tensor:
        """Tokens attend to per-prompt image tokens without projecting the 4096 image tokens.

        scores = (q Wk) x^T + q.bk and out = (P x) Wv^T + bv (softmax rows sum to 1).
        """
        nh = attn.num_heads
        wk, bk = _linear_weight(attn.k_proj)
        wv, bv = _linear_weight(attn.v_proj)
        b, t, c = q_in.shape
        q = _heads(attn.q_proj(q_in), nh)  # [B, H, T, d]
        d = q.shape[-1]
        scale = 1.0 / math.sqrt(d)
        qk = torch.einsum("bhtd,hdc->bhtc", q, wk.view(nh, d, c)).reshape(b, nh * t, c) * scale
        qb = (q * bk.view(1, nh, 1, d)).sum(-1).reshape(b, nh * t, 1) * scale
        p = torch.softmax(torch.baddbmm(qb, qk, xk.transpose(1, 2)), dim=-1)  # [B, H*T, N]
        px = torch.bmm(p, xv).view(b, nh, t, c)
        out = torch.einsum("bhtc,hdc->bhtd", px, wv.view(nh, d, c)) + bv.view(1, nh, 1, d)
        res: Tensor = attn.out_proj(_merge_heads(out))
        return res

    @staticmethod
    def _img2tok(
        attn: Any, residual: Tensor, xq: Tensor | None, q_pre: Tensor | None, k_in: Tensor, v_in: Tensor
    ) -> Tensor:
        """`residual` + image tokens attending to the prompt's tokens, without any 4096-row projection.

        Scores are x (Wq^T k^T) (or precomputed layer-0 queries), laid out [B, H, T, N] so the softmax
        over the few tokens vectorises over N; the output is P^T (v Wo^T + bo/H) because each
        image token's attention weights sum to 1 per head, which folds bias and residual into one bmm.
        """
        nh = attn.num_heads
        k = _heads(attn.k_proj(k_in), nh)  # [B, H, T, d]
        v = _heads(attn.v_proj(v_in), nh)
        b, _, t, d = k.shape
        scale = 1.0 / math.sqrt(d)
        if q_pre is not None:
            scores = torch.matmul(k * scale, q_pre.transpose(-1, -2))  # [B, H, T, N]
        else:
            assert xq is not None
            wq, bq = _linear_weight(attn.q_proj)
            c = xq.shape[-1]
            a = torch.einsum("bhtd,hdc->bhtc", k, wq.view(nh, d, c)).reshape(b, nh * t, c) * scale
            ab = (k * bq.view(1, nh, 1, d)).sum(-1).reshape(b, nh * t, 1) * scale
            scores = torch.baddbmm(ab, a, xq.transpose(1, 2)).view(b, nh, t, -1)
        p = torch.softmax(scores, dim=2).reshape(b, nh * t, -1)  # softmax over the prompt tokens
        wo, bo = _linear_weight(attn.out_proj)
        c_out = wo.shape[0]
        m = torch.einsum("bhtd,chd->bhtc", v, wo.view(c_out, nh, d)) + (bo / nh).view(1, 1, 1, c_out)
        return torch.baddbmm(residual.expand(b, -1, -1), p.transpose(1, 2), m.reshape(b, nh * t, c_out))

    # ---- per batch -------------------------------------------------------------------------------
    def run_transformer(self, st: _ImageState, coords: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Two-way transformer for B single-point prompts -> (mask tokens, keys, multimask IoU preds)."""
        labels = torch.ones(coords.shape[0], 1, dtype=torch.int, device=coords.device)
        sparse, _ = self.prompt_encoder(points=(coords, labels), boxes=None, masks=None)
        b = sparse.shape[0]
        tokens = torch.cat((self.output_tokens.unsqueeze(0).expand(b, -1, -1).to(sparse.dtype), sparse), 1)
        tr = self.transformer
        queries, qpe = tokens, tokens
        keys: Tensor | None = None  # None while the image side is still the shared keys0
        kpe = st.pe
        for layer in tr.layers:
            if layer.skip_first_layer_pe:
                queries = layer.self_attn(q=queries, k=queries, v=queries)
            else:
                q = queries + qpe
                queries = queries + layer.self_attn(q=q, k=q, v=queries)
            queries = layer.norm1(queries)
            q = queries + qpe
            if keys is None:
                attn = self._tok2img_pre(layer.cross_attn_token_to_image, q, st.k0, st.v0)
            else:
                kpe = keys + st.pe  # shared by both cross attentions of this layer
                attn = self._tok2img(layer.cross_attn_token_to_image, q, kpe, keys)
            queries = layer.norm2(queries + attn)
            queries = layer.norm3(queries + layer.mlp(queries))
            q = queries + qpe
            i2t = layer.cross_attn_image_to_token
            if keys is None:
                keys = layer.norm4(self._img2tok(i2t, st.keys0, None, st.q0, q, queries))
            else:
                keys = layer.norm4(self._img2tok(i2t, keys, kpe, None, q, queries))
        assert keys is not None
        attn = self._tok2img(tr.final_attn_token_to_image, queries + qpe, keys + st.pe, keys)
        hs = tr.norm_final_attn(queries + attn)
        iou = self.iou_head(hs[:, self.s])[:, 1:]  # multimask_output=True drops the single-mask token
        mask_tokens = hs[:, self.s + 1 : self.s + 1 + self.num_mask_tokens]
        return mask_tokens, keys, iou

    def upscale(self, st: _ImageState, mask_tokens: Tensor, keys: Tensor) -> Tensor:
        """Low-res (256x256) logits of the three multimask outputs for the given prompts.

        Runs channels-last (NHWC): keys already are, LayerNorm2d becomes a plain layer_norm over the
        last dim, and oneDNN's transposed convolutions are ~3x faster than on NCHW.
        """
        b, _, c = keys.shape
        h, w = st.hw
        x = self.dc1(keys.view(b, h, w, c))
        if self.use_high_res:
            x = x + st.high_res[1]
        x = self.act1(F.layer_norm(x, (x.shape[-1],), self.ln1.weight, self.ln1.bias, self.ln1.eps))
        x = self.dc2(x)
        if self.use_high_res:
            x = x + st.high_res[0]
        x = self.act2(x)
        hyper = torch.stack([self.hyper[i](mask_tokens[:, i]) for i in range(1, self.num_mask_tokens)], 1)
        _, hh, ww, cc = x.shape
        masks = torch.bmm(x.reshape(b, hh * ww, cc), hyper.transpose(1, 2).to(x.dtype))
        return masks.transpose(1, 2).reshape(b, -1, hh, ww)


class FastMaskGenerator:
    """Drop-in for SAM2AutomaticMaskGenerator(model, ...).generate on the single-crop, binary-mask path.

    Defaults are samseg's recommended CPU mode: all exact optimisations on, every approximate one off.
    """

    def __init__(
        self,
        model: SAM2Base,
        *,
        points_per_side: int = 32,
        points_per_batch: int = 64,
        pred_iou_thresh: float = 0.8,
        stability_score_thresh: float = 0.95,
        box_nms_thresh: float = 0.7,
        min_mask_region_area: int = 0,
        int8: bool = False,
        compile: bool = False,
        half: bool = False,
        prune: bool = False,
    ) -> None:
        from sam2.sam2_image_predictor import SAM2ImagePredictor
        from sam2.utils.amg import build_point_grid

        self.model = model
        self.device = torch.device(model.device)
        self.predictor = SAM2ImagePredictor(model)
        self.resolution = int(model.image_size)
        self.grid = build_point_grid(points_per_side)
        self.points_per_batch = points_per_batch
        self.pred_iou_thresh = pred_iou_thresh
        self.stability_score_thresh = stability_score_thresh
        self.box_nms_thresh = box_nms_thresh
        self.min_mask_region_area = min_mask_region_area
        self.half = half
        self.prune = prune
        if int8 and (self.device.type != "cpu" or half):
            raise ValueError("int8 dynamic quantisation is CPU-only and float32-only (not with half)")
        self.decoder = _Decoder(model, int8=int8).eval()
        if half and self.device.type == "cuda":
            self.points_per_batch = len(self.grid)  # all points in one batch
        self._hole_filler: Any = None
        if min_mask_region_area > 0:
            from sam2.utils.transforms import SAM2Transforms

            self._hole_filler = SAM2Transforms(
                self.resolution, _MASK_THRESHOLD, min_mask_region_area, min_mask_region_area
            )
        # Prompts per decoder call: per-prompt activations are 4 MB (4096x256 fp32), so CPU chunks of
        # 16 stay cache-friendly (measured ~2x faster per prompt than 64); CUDA takes the whole batch.
        self._chunk = min(self.points_per_batch, 16) if self.device.type == "cpu" else self.points_per_batch
        self.timings: dict[str, float] = {}
        self._compiled = compile
        self._transformer_fn: Any = self.decoder.run_transformer
        if compile:
            self._transformer_fn = torch.compile(self.decoder.run_transformer, dynamic=False)
            self._warm_up()

    # ---- helpers ---------------------------------------------------------------------------------
    def _autocast(self) -> Any:
        if not self.half:
            return torch.autocast(self.device.type, enabled=False)
        dtype = torch.float16 if self.device.type == "cuda" else torch.bfloat16
        return torch.autocast(self.device.type, dtype=dtype)

    @torch.inference_mode()
    def _warm_up(self) -> None:
        """Trigger the torch.compile once (fixed batch shape) so the first real image does not pay it."""
        dtype = next(self.model.parameters()).dtype
        c = int(self.model.sam_mask_decoder.transformer_dim)
        side = self.resolution // 16
        embed = torch.zeros(1, c, side, side, device=self.device, dtype=dtype)
        high = [
            torch.zeros(1, c // 8, side * 4, side * 4, device=self.device, dtype=dtype),
            torch.zeros(1, c // 4, side * 2, side * 2, device=self.device, dtype=dtype),
        ]
        with self._autocast():
            st = self.decoder.image_state(embed, high)
            coords = torch.full((self._chunk, 1, 2), 10.0, device=self.device)
            self._transformer_fn(st, coords)

    def _encode(self, image: np.ndarray) -> _ImageState:
        self.predictor.set_image(image)
        feats = self.predictor._features
        state = self.decoder.image_state(feats["image_embed"], list(feats["high_res_feats"]))
        self.predictor.reset_predictor()
        return state

    # ---- main ------------------------------------------------------------------------------------
    @torch.inference_mode()
    def generate(self, image: np.ndarray) -> list[dict[str, Any]]:
        """Masks for an HxWx3 uint8 RGB image, as upstream's records (binary `segmentation`)."""
        from torchvision.ops.boxes import batched_nms

        h, w = image.shape[:2]
        t0 = time.perf_counter()
        with self._autocast():
            st = self._encode(image)
        self.timings = {"encode": time.perf_counter() - t0, "transformer": 0.0, "upscale": 0.0, "full_res": 0.0}
        points = torch.as_tensor(self.grid * np.array([[w, h]]), dtype=torch.float32)
        # Same coordinate transform as SAM2Transforms.transform_coords(normalize=True).
        in_points = points.clone()
        in_points[:, 0] = in_points[:, 0] / w
        in_points[:, 1] = in_points[:, 1] / h
        in_points = (in_points * self.resolution).to(self.device)
        low_hw = (st.hw[0] * 4, st.hw[1] * 4)
        ctx = _Frame(
            st=st,
            points=points,
            in_points=in_points,
            grid=cell_grid(low_hw, (h, w)),
            covered=torch.zeros(low_hw, dtype=torch.bool) if self.prune else None,
        )
        cands: list[_Candidate] = []
        n, bs = len(points), self.points_per_batch
        for start in range(0, n, bs):
            idx = torch.arange(start, min(start + bs, n))
            if ctx.covered is not None:
                px = points[idx].long()
                cy = ctx.grid.ys.i0[px[:, 1].clamp(0, h - 1)]
                cx = ctx.grid.xs.i0[px[:, 0].clamp(0, w - 1)]
                idx = idx[~ctx.covered[cy, cx]]
            for sub in torch.split(idx, self._chunk):
                cands.extend(self._process_chunk(ctx, sub))

        t0 = time.perf_counter()
        if not cands:
            return []
        boxes = torch.tensor([c.box for c in cands], dtype=torch.float32)
        scores = torch.tensor([c.iou for c in cands], dtype=torch.float32)
        order = batched_nms(boxes, scores, torch.zeros(len(cands)), iou_threshold=self.box_nms_thresh)
        low_shape = (len(ctx.grid.ny), len(ctx.grid.nx))
        records: list[dict[str, Any]] = []
        for k in order.tolist():
            c = cands[k]
            if c.pos_flat is None:
                seg = np.unpackbits(c.packed)[: h * w].astype(bool).reshape(h, w)
            else:
                inside = np.unpackbits(c.packed)[: low_shape[0] * low_shape[1]].astype(bool)
                seg = paint_mask(torch.from_numpy(inside).view(low_shape), c.pos_flat, ctx.grid)
            x_lo, y_lo, x_hi, y_hi = (float(v) for v in c.box)
            records.append(
                {
                    "segmentation": seg,
                    "area": c.area,
                    "bbox": [x_lo, y_lo, x_hi - x_lo, y_hi - y_lo],
                    "predicted_iou": c.iou,
                    "point_coords": [c.point],
                    "stability_score": c.stability,
                    "crop_box": [0.0, 0.0, float(w), float(h)],
                }
            )
        self.timings["full_res"] += time.perf_counter() - t0
        return records

    def _process_chunk(self, ctx: _Frame, idx: Tensor) -> list[_Candidate]:
        """Decoder + filters for one chunk of prompts; returns the candidates that pass all filters."""
        real = len(idx)
        if real == 0:
            return []
        coords = ctx.in_points[idx.to(self.device)][:, None, :]
        if self._compiled and real < self._chunk:
            coords = torch.cat([coords, coords[-1:].expand(self._chunk - real, -1, -1)])  # fixed shape
        t0 = time.perf_counter()
        with self._autocast():
            mask_tokens, keys, iou = self._transformer_fn(ctx.st, coords)
            iou = iou[:real].float()
            keep = (iou > self.pred_iou_thresh) | (self.pred_iou_thresh <= 0.0)  # upstream skips thresh <= 0
            sel = keep.any(1).nonzero().flatten()
            t1 = time.perf_counter()
            self.timings["transformer"] += t1 - t0
            if len(sel) == 0:
                return []
            low = self.decoder.upscale(ctx.st, mask_tokens[sel], keys[sel]).float()
        keep_sel = keep[sel]
        low = low[keep_sel]  # [m, 256, 256]: point-major, then mask index (upstream's order)
        if self._hole_filler is not None:
            low = self._hole_filler.postprocess_masks(low[:, None], low.shape[-2:])[:, 0]
        on_device = low.device.type != "cpu"  # CUDA: full-res work stays on the GPU (dense path)
        low_cpu = low.cpu() if not on_device else low
        ious = iou[sel][keep_sel].cpu().tolist()
        pts = ctx.points[idx[sel.cpu()]].repeat_interleave(keep.shape[1], 0)[keep_sel.flatten().cpu()]
        t2 = time.perf_counter()
        self.timings["upscale"] += t2 - t1
        thresholds = (_MASK_THRESHOLD - _STABILITY_OFFSET, _MASK_THRESHOLD, _MASK_THRESHOLD + _STABILITY_OFFSET)
        if on_device:
            noisy = torch.ones(len(low), dtype=torch.bool)
        else:
            noisy = boundary_fraction(low_cpu, thresholds) > _DENSE_BOUNDARY_FRACTION
        m = len(low)
        counts = torch.zeros(m, 3, dtype=torch.int64)
        boxes = torch.zeros(m, 4, dtype=torch.int64)
        packed: list[np.ndarray] = [np.zeros(0, np.uint8)] * m
        pos: list[Tensor | None] = [None] * m
        sparse_idx = (~noisy).nonzero().flatten()
        if len(sparse_idx):
            cm = cell_masks(low_cpu[sparse_idx], ctx.grid, thresholds, mask_idx=1)
            counts[sparse_idx], boxes[sparse_idx] = cm.counts, cm.boxes
            order = torch.argsort(cm.pos_mask, stable=True)
            split = torch.split(cm.pos_flat[order], torch.bincount(cm.pos_mask, minlength=len(sparse_idx)).tolist())
            inside = cm.inside.numpy()
            for n, j in enumerate(sparse_idx.tolist()):
                packed[j], pos[j] = np.packbits(inside[n]), split[n].clone()
                if ctx.covered is not None:
                    ctx.covered |= cm.inside[n]
        dense_idx = noisy.nonzero().flatten()
        if len(dense_idx):
            dense_low = low[dense_idx.to(low.device)]
            d_counts, d_boxes, d_packed = dense_masks(
                dense_low, ctx.grid.out_hw, thresholds, mask_idx=1, chunk=16 if on_device else 4
            )
            counts[dense_idx], boxes[dense_idx] = d_counts, d_boxes
            for n, j in enumerate(dense_idx.tolist()):
                packed[j] = d_packed[n]
            if ctx.covered is not None:
                ctx.covered |= (dense_low > _MASK_THRESHOLD).any(0).cpu()
        # Upstream: intersections / unions of int32 counts -> float32 (0 / 0 -> NaN fails any threshold).
        stab = counts[:, 2].to(torch.int32) / counts[:, 0].to(torch.int32)
        ok = (stab >= self.stability_score_thresh) | (self.stability_score_thresh <= 0.0)
        out = [
            _Candidate(
                packed=packed[j],
                pos_flat=pos[j],
                box=boxes[j].tolist(),
                area=int(counts[j, 1]),
                stability=float(stab[j]),
                iou=float(ious[j]),
                point=pts[j].tolist(),
            )
            for j in ok.nonzero().flatten().tolist()
        ]
        self.timings["full_res"] += time.perf_counter() - t2
        return out
