"""FastMaskGenerator: upstream SAM-2 AMG records from the re-associated decoder and cell-level statistics.

See samseg.runtime.amg for what is exact and what is approximate.
"""

from __future__ import annotations

import functools
import time
import warnings
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np
import structlog
import torch
import torch.nn.functional as F
from torch import Tensor

from samseg.core.errors import JobCanceled
from samseg.core.settings import CPU_POINTS_PER_BATCH, GPU_POINTS_PER_BATCH
from samseg.runtime.amg.decoder import Candidate, Frame, ImageState, PromptDecoder
from samseg.runtime.amg.geometry import (
    DENSE_BOUNDARY_FRACTION,
    MASK_THRESHOLD,
    STABILITY_OFFSET,
    boundary_fraction,
    box_nms,
    cell_grid,
    cell_masks,
    dense_chunk,
    dense_masks,
)
from samseg.runtime.amg.output import GeneratedMask, PaintContext
from samseg.runtime.amg.params import AmgParams

# Survivors per mask_logits call on CPU: each one's image tokens are 4 MB and its upscaled features up to 8 MB, so
# they run 4 at a time as before the transformer was factored (8 would put every image-token block over glibc's
# 32 MiB mmap ceiling, samseg.runtime.allocator).
CPU_MASK_CHUNK = 4

if TYPE_CHECKING:
    from sam2.modeling.sam2_base import SAM2Base

log = structlog.get_logger(__name__)


IMAGENET_MEAN = (0.485, 0.456, 0.406)  # SAM2Transforms' Normalize
IMAGENET_STD = (0.229, 0.224, 0.225)


@functools.cache
def _image_transform(resolution: int) -> Any:
    """SAM2Transforms' image path (ToTensor, Resize to a square, ImageNet Normalize), built once per process.

    Upstream builds it with torch.jit.script in every SAM2ImagePredictor (~1.3 s per generator on CPU), from
    torchvision modules; importing torchvision costs ~1.7 s more on 2 cores (it loads torch._dynamo, sympy and
    triton), paid by every `samseg segment`. The same operations, called through torch directly, give the
    same tensors bit for bit (tests/unit/test_amg.py compares them with torchvision's transforms, and
    tests/integration/test_amg_model.py the encoder's input with SAM2ImagePredictor's).
    """
    return torch.nn.Sequential(_ToTensor(), _Resize(resolution), _Normalize())


class _Resize(torch.nn.Module):
    """torchvision's Resize((r, r)) on a float CHW tensor: bilinear, antialiased, unchanged at the same size."""

    def __init__(self, resolution: int) -> None:
        super().__init__()
        self.size = [resolution, resolution]

    def forward(self, x: Tensor) -> Tensor:
        if list(x.shape[-2:]) == self.size:
            return x
        out: Tensor = F.interpolate(x[None], size=self.size, mode="bilinear", align_corners=False, antialias=True)
        return out[0]


class _Normalize(torch.nn.Module):
    """torchvision's Normalize(IMAGENET_MEAN, IMAGENET_STD): (x - mean) / std per channel, in float32."""

    def forward(self, x: Tensor) -> Tensor:
        mean = torch.as_tensor(IMAGENET_MEAN, dtype=x.dtype, device=x.device).view(-1, 1, 1)
        std = torch.as_tensor(IMAGENET_STD, dtype=x.dtype, device=x.device).view(-1, 1, 1)
        return x.sub(mean).div_(std)


class _ToTensor(torch.nn.Module):
    """torchvision's ToTensor for an HxWx3 uint8 array, in one float buffer instead of three.

    ToTensor makes a contiguous uint8 CHW copy, then `.to(float32)` and `.div(255)`, each a new tensor: at 40 MP
    that is 120 + 480 + 480 MB alive at once, the segment stage's peak (issue #15). Here the uint8 HWC array is
    converted straight into one float32 CHW buffer and divided in place: the same element-wise float32 operations,
    so the same values bit for bit (tests/integration/test_amg_model.py compares the encoder's input with
    SAM2ImagePredictor's), with 480 MB at most.
    """

    def forward(self, x: Any) -> Tensor:
        with warnings.catch_warnings():
            # A decoded image is often a read-only array; it is only read here (copied into `out`).
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            array = torch.from_numpy(np.ascontiguousarray(x)).permute(2, 0, 1)
        out = torch.empty(array.shape, dtype=torch.float32)
        out.copy_(array)
        return out.div_(255)


@functools.lru_cache(maxsize=8)
def _point_grid(points_per_side: int) -> np.ndarray:
    """Upstream's grid for `points_per_side` (sam2.utils.amg.build_point_grid), built once per size."""
    from sam2.utils.amg import build_point_grid

    grid: np.ndarray = build_point_grid(points_per_side)
    return grid


@functools.lru_cache(maxsize=8)
def _hole_filler(resolution: int, area: int) -> Any:
    """Upstream's SAM2Transforms for min_mask_region_area (it scripts itself: built once per process)."""
    from sam2.utils.transforms import SAM2Transforms

    return SAM2Transforms(resolution, MASK_THRESHOLD, area, area)


class FastMaskGenerator:
    """Drop-in for SAM2AutomaticMaskGenerator(model, ...).generate on the single-crop, binary-mask path.

    Defaults are samseg's recommended CPU mode: all exact optimisations on, every approximate one off.
    """

    def __init__(
        self,
        model: SAM2Base,
        *,
        points_per_side: int = 32,
        points_per_batch: int | None = None,
        pred_iou_thresh: float = 0.8,
        stability_score_thresh: float = 0.95,
        box_nms_thresh: float = 0.7,
        min_mask_region_area: int = 0,
        int8: bool = False,
        compile: bool = False,
        half: bool = False,
        prune: bool = False,
    ) -> None:
        self.model = model
        self.device = torch.device(model.device)
        self.resolution = int(model.image_size)
        self._transform = _image_transform(self.resolution)
        # The constructor's values are the defaults of every call; `generate_masks(params=…)` overrides them for
        # one image (a job's options) without building another generator (with `compile`, that would compile).
        self.params = AmgParams(
            points_per_side=points_per_side,
            pred_iou_thresh=pred_iou_thresh,
            stability_score_thresh=stability_score_thresh,
            box_nms_thresh=box_nms_thresh,
            min_mask_region_area=min_mask_region_area,
        )
        self.grid = _point_grid(points_per_side)
        if points_per_batch is None:  # the measured per-device default (docs/performance-cpu.md)
            points_per_batch = CPU_POINTS_PER_BATCH if self.device.type == "cpu" else GPU_POINTS_PER_BATCH
        self.points_per_batch = points_per_batch
        self.half = half
        self.prune = prune
        if int8 and (self.device.type != "cpu" or half):
            raise ValueError("int8 dynamic quantisation is CPU-only and float32-only (not with half)")
        # The factored two-layer transformer (decoder.LowRankImage) was measured on CPU float32 only; CUDA and
        # autocast keep the materialised path.
        low_rank = self.device.type == "cpu" and not half
        self.decoder = PromptDecoder(model, int8=int8, low_rank=low_rank).eval()
        if half and self.device.type == "cuda":
            self.points_per_batch = len(self.grid)  # all points in one batch
        # Prompts per decoder call. On CPU the transformer keeps each prompt's image side as factors of at most
        # ~2 MB per tensor (decoder.LowRankImage), so the default chunk of 8 keeps every block under glibc's
        # 32 MiB mmap ceiling (samseg.runtime.allocator) and reuses it from the heap instead of mmapping and
        # page-faulting it again per chunk; at most 16. Survivors finish 4 at a time (CPU_MASK_CHUNK). CUDA takes
        # the whole batch.
        self._chunk = min(self.points_per_batch, 16) if self.device.type == "cpu" else self.points_per_batch
        self._mask_chunk = min(self._chunk, CPU_MASK_CHUNK) if self.device.type == "cpu" else self._chunk
        self.timings: dict[str, float] = {}
        self._compiled = compile
        self._transformer_fn: Any = self.decoder.run_transformer
        if compile:
            self._transformer_fn = torch.compile(self.decoder.run_transformer, dynamic=False)
            try:
                self._warm_up()
            except Exception as exc:  # any backend failure: eager gives the same masks
                # On CPU inductor compiles C++ at run time; the slim images ship no compiler. A speed flag must
                # not stop a worker from starting: say why, and run eager (exact, the same masks).
                log.error(
                    "amg_compile_failed",
                    error=f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}",
                    fallback="eager",
                    hint="install a C++ compiler (g++) in the image for SAMSEG_AMG_COMPILE on CPU, or unset it",
                )
                self._transformer_fn = self.decoder.run_transformer
                self._compiled = False

    @property
    def compiled(self) -> bool:
        """Whether the transformer runs compiled (False when SAMSEG_AMG_COMPILE's compile failed)."""
        return self._compiled

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

    def _encode(self, image: np.ndarray) -> ImageState:
        """SAM2ImagePredictor.set_image's maths (same transforms, same ops), without building a predictor."""
        model: Any = self.model
        input_image = self._transform(image)[None].to(self.device)
        backbone_out = model.forward_image(input_image)
        _, vision_feats, _, _ = model._prepare_backbone_features(backbone_out)
        if model.directly_add_no_mem_embed:
            vision_feats[-1] = vision_feats[-1] + model.no_mem_embed
        r = self.resolution
        sizes = [(r // 4, r // 4), (r // 8, r // 8), (r // 16, r // 16)]  # the predictor's _bb_feat_sizes
        feats = [
            feat.permute(1, 2, 0).view(1, -1, *size) for feat, size in zip(vision_feats[::-1], sizes[::-1], strict=True)
        ][::-1]
        return self.decoder.image_state(feats[-1], feats[:-1])

    # ---- main ------------------------------------------------------------------------------------
    @torch.inference_mode()
    def generate(self, image: np.ndarray, params: AmgParams | None = None) -> list[dict[str, Any]]:
        """Masks for an HxWx3 uint8 RGB image, as upstream's records (binary `segmentation`)."""
        masks = self.generate_masks(image, params)
        t0 = time.perf_counter()
        records = [m.record() for m in masks]
        self.timings["full_res"] += time.perf_counter() - t0
        return records

    @torch.inference_mode()
    def generate_masks(
        self,
        image: np.ndarray,
        params: AmgParams | None = None,
        should_stop: Callable[[], bool] | None = None,
    ) -> list[GeneratedMask]:
        """The same masks in upstream's order, compact: full resolution only when a caller asks, one at a time.

        `params` (default: the constructor's) are this image's grid and thresholds; `should_stop` is asked
        before the encoder and between decoder chunks, and `JobCanceled` is raised once it says True (a canceled
        job stops within one chunk, not at the end of the image). Only `multimask_output=True` is implemented
        here (samseg.runtime.segmenter runs upstream's generator for False).
        """
        p = params or self.params
        if not p.multimask_output:
            raise ValueError("FastMaskGenerator implements multimask_output=True only")
        stop = should_stop or _never
        if stop():
            raise JobCanceled()
        grid = _point_grid(p.points_per_side)
        filler = _hole_filler(self.resolution, p.min_mask_region_area) if p.min_mask_region_area > 0 else None
        h, w = image.shape[:2]
        t0 = time.perf_counter()
        with self._autocast():
            st = self._encode(image)
        self.timings = {"encode": time.perf_counter() - t0, "transformer": 0.0, "upscale": 0.0, "full_res": 0.0}
        points = torch.as_tensor(grid * np.array([[w, h]]), dtype=torch.float32)
        # Same coordinate transform as SAM2Transforms.transform_coords(normalize=True).
        in_points = points.clone()
        in_points[:, 0] = in_points[:, 0] / w
        in_points[:, 1] = in_points[:, 1] / h
        in_points = (in_points * self.resolution).to(self.device)
        low_hw = (st.hw[0] * 4, st.hw[1] * 4)
        ctx = Frame(
            st=st,
            points=points,
            in_points=in_points,
            grid=cell_grid(low_hw, (h, w)),
            covered=torch.zeros(low_hw, dtype=torch.bool) if self.prune else None,
            params=p,
            hole_filler=filler,
        )
        cands: list[Candidate] = []
        n, bs = len(points), self.points_per_batch
        for start in range(0, n, bs):
            idx = torch.arange(start, min(start + bs, n))
            if ctx.covered is not None:
                px = points[idx].long()
                cy = ctx.grid.ys.i0[px[:, 1].clamp(0, h - 1)]
                cx = ctx.grid.xs.i0[px[:, 0].clamp(0, w - 1)]
                idx = idx[~ctx.covered[cy, cx]]
            for sub in torch.split(idx, self._chunk):
                if stop():
                    raise JobCanceled()
                cands.extend(self._process_chunk(ctx, sub))

        t0 = time.perf_counter()
        if not cands:
            return []
        boxes = torch.tensor([c.box for c in cands], dtype=torch.float32)
        scores = torch.tensor([c.iou for c in cands], dtype=torch.float32)
        order = box_nms(boxes, scores, p.box_nms_thresh)
        paint = PaintContext(
            height=h,
            width=w,
            y_cell=ctx.grid.ys.i0.numpy(),
            x_cell=ctx.grid.xs.i0.numpy(),
            low_shape=(len(ctx.grid.ny), len(ctx.grid.nx)),
        )
        masks = [GeneratedMask(cands[k], paint) for k in order.tolist()]
        self.timings["full_res"] += time.perf_counter() - t0
        return masks

    def _process_chunk(self, ctx: Frame, idx: Tensor) -> list[Candidate]:
        """Decoder + filters for one chunk of prompts; returns the candidates that pass all filters."""
        real = len(idx)
        if real == 0:
            return []
        coords = ctx.in_points[idx.to(self.device)][:, None, :]
        if self._compiled and real < self._chunk:
            coords = torch.cat([coords, coords[-1:].expand(self._chunk - real, -1, -1)])  # fixed shape
        t0 = time.perf_counter()
        with self._autocast():
            queries, tokens, image, iou = self._transformer_fn(ctx.st, coords)
            iou = iou[:real].float()
            iou_thresh = ctx.params.pred_iou_thresh
            keep = (iou > iou_thresh) | (iou_thresh <= 0.0)  # upstream skips thresh <= 0
            sel = keep.any(1).nonzero().flatten()
            t1 = time.perf_counter()
            self.timings["transformer"] += t1 - t0
            if len(sel) == 0:
                return []
            low = torch.cat(
                [
                    self.decoder.mask_logits(ctx.st, queries[s], tokens[s], tuple(part[s] for part in image))
                    for s in torch.split(sel, self._mask_chunk)
                ]
            ).float()
        keep_sel = keep[sel]
        low = low[keep_sel]  # [m, 256, 256]: point-major, then mask index (upstream's order)
        if ctx.hole_filler is not None:
            low = ctx.hole_filler.postprocess_masks(low[:, None], low.shape[-2:])[:, 0]
        on_device = low.device.type != "cpu"  # CUDA: full-res work stays on the GPU (dense path)
        low_cpu = low.cpu() if not on_device else low
        ious = iou[sel][keep_sel].cpu().tolist()
        pts = ctx.points[idx[sel.cpu()]].repeat_interleave(keep.shape[1], 0)[keep_sel.flatten().cpu()]
        t2 = time.perf_counter()
        self.timings["upscale"] += t2 - t1
        thresholds = (MASK_THRESHOLD - STABILITY_OFFSET, MASK_THRESHOLD, MASK_THRESHOLD + STABILITY_OFFSET)
        if on_device:
            noisy = torch.ones(len(low), dtype=torch.bool)
        else:
            noisy = boundary_fraction(low_cpu, thresholds) > DENSE_BOUNDARY_FRACTION
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
                dense_low, ctx.grid.out_hw, thresholds, mask_idx=1, chunk=dense_chunk(ctx.grid.out_hw, on_device)
            )
            counts[dense_idx], boxes[dense_idx] = d_counts, d_boxes
            for n, j in enumerate(dense_idx.tolist()):
                packed[j] = d_packed[n]
            if ctx.covered is not None:
                ctx.covered |= (dense_low > MASK_THRESHOLD).any(0).cpu()
        # Upstream: intersections / unions of int32 counts -> float32 (0 / 0 -> NaN fails any threshold).
        stab = counts[:, 2].to(torch.int32) / counts[:, 0].to(torch.int32)
        stab_thresh = ctx.params.stability_score_thresh
        ok = (stab >= stab_thresh) | (stab_thresh <= 0.0)
        out = [
            Candidate(
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


def _never() -> bool:
    return False
