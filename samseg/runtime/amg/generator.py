"""FastMaskGenerator: upstream SAM-2 AMG records from the re-associated decoder and cell-level statistics.

See samseg.runtime.amg for what is exact and what is approximate.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from samseg.runtime.amg.decoder import Candidate, Frame, ImageState, PromptDecoder
from samseg.runtime.amg.geometry import (
    DENSE_BOUNDARY_FRACTION,
    MASK_THRESHOLD,
    STABILITY_OFFSET,
    boundary_fraction,
    cell_grid,
    cell_masks,
    dense_masks,
    paint_mask,
)

if TYPE_CHECKING:
    from sam2.modeling.sam2_base import SAM2Base


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
        self.decoder = PromptDecoder(model, int8=int8).eval()
        if half and self.device.type == "cuda":
            self.points_per_batch = len(self.grid)  # all points in one batch
        self._hole_filler: Any = None
        if min_mask_region_area > 0:
            from sam2.utils.transforms import SAM2Transforms

            self._hole_filler = SAM2Transforms(
                self.resolution, MASK_THRESHOLD, min_mask_region_area, min_mask_region_area
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

    def _encode(self, image: np.ndarray) -> ImageState:
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
        ctx = Frame(
            st=st,
            points=points,
            in_points=in_points,
            grid=cell_grid(low_hw, (h, w)),
            covered=torch.zeros(low_hw, dtype=torch.bool) if self.prune else None,
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
                dense_low, ctx.grid.out_hw, thresholds, mask_idx=1, chunk=16 if on_device else 4
            )
            counts[dense_idx], boxes[dense_idx] = d_counts, d_boxes
            for n, j in enumerate(dense_idx.tolist()):
                packed[j] = d_packed[n]
            if ctx.covered is not None:
                ctx.covered |= (dense_low > MASK_THRESHOLD).any(0).cpu()
        # Upstream: intersections / unions of int32 counts -> float32 (0 / 0 -> NaN fails any threshold).
        stab = counts[:, 2].to(torch.int32) / counts[:, 0].to(torch.int32)
        ok = (stab >= self.stability_score_thresh) | (self.stability_score_thresh <= 0.0)
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
