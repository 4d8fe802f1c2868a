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
    the 128-d head space ((x W^T) k^T == x (W^T k^T)); this halves the decoder's dominant matmuls;
  * the predicted-IoU filter runs on the decoder's IoU head *before* mask upscaling, so prompts
    whose three masks all fail skip the upscaling convolutions and everything after;
  * full-resolution work is confined to the bounding box of low-resolution logits above the lowest
    threshold in use (bilinear interpolation is a convex combination, so every pixel outside it is
    below every threshold), with upstream's own interpolation formula; stability scores are
    computed there, and only for candidates that need them (all of them if
    stability_score_thresh > 0, otherwise only for the masks that survive NMS);
  * box NMS runs on these boxes before any full-size mask is materialised, and binary masks are
    pasted straight into the output (no RLE round trip).
  SAM-2 already upsamples the 256x256 logits to the original size in one bilinear resize (SAM-1
  used two), so there is no second resize to remove.

Approximate (constructor flags, each measured in benchmarks/amg.py against upstream):
  * `int8`: dynamic int8 quantisation (CPU) of the decoder's Linear layers, including the
    upscaling transposed convolutions rewritten as per-pixel Linear layers;
  * `compile`: torch.compile (inductor) of the per-batch transformer; the compile is paid once in
    the constructor on a dummy input (tens of seconds on CPU), later images reuse it;
  * `half`: CUDA float16 / CPU bfloat16 autocast for the decoder; on CUDA all points go in one batch;
  * `prune`: skip grid points that fall inside masks already accepted by earlier batches.

Only upstream's default single-crop path (crop_n_layers=0) is implemented; multi-crop (crop_n_layers
> 0), use_m2m and the RLE output modes remain upstream-only. With min_mask_region_area > 0 the
low-resolution hole/sprinkle filling is delegated to upstream's `SAM2Transforms` exactly as
`SAM2ImagePredictor` does (it needs sam2's CUDA extension and is skipped with a warning without it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

if TYPE_CHECKING:
    from sam2.modeling.sam2_base import SAM2Base

__all__ = ["FastMaskGenerator", "bilinear_axis", "upsample_region"]

_STABILITY_OFFSET = 1.0  # upstream's stability_score_offset default
_MASK_THRESHOLD = 0.0  # upstream's mask_threshold default


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


def upsample_region(
    logits: Tensor, ys: AxisMap, xs: AxisMap, y_lo: int, y_hi: int, x_lo: int, x_hi: int
) -> Tensor:
    """Bilinear upsample of a 2-D logit map, evaluated only on output rows [y_lo, y_hi) x [x_lo, x_hi).

    Same formula and order as PyTorch's CPU kernel: out = wy0*(wx0*a + wx1*b) + wy1*(wx0*c + wx1*d).
    """
    r0, r1 = ys.i0[y_lo:y_hi], ys.i1[y_lo:y_hi]
    c0, c1 = xs.i0[x_lo:x_hi], xs.i1[x_lo:x_hi]
    wx0, wx1 = xs.w0[x_lo:x_hi], xs.w1[x_lo:x_hi]
    base = int(r0[0])
    rows = logits[base : int(r1[-1]) + 1]
    horiz = rows[:, c0] * wx0 + rows[:, c1] * wx1  # [low-res rows, out cols]
    return horiz[r0 - base] * ys.w0[y_lo:y_hi, None] + horiz[r1 - base] * ys.w1[y_lo:y_hi, None]


def _axis_range(axis: AxisMap, lo: int, hi: int) -> tuple[int, int]:
    """Output index range whose source indices touch low-res rows [lo, hi] (indices are monotone)."""
    start = int(torch.searchsorted(axis.i1, lo, side="left"))
    stop = int(torch.searchsorted(axis.i0, hi, side="right"))
    return start, stop


def _heads(x: Tensor, num_heads: int) -> Tensor:
    b, n, c = x.shape
    return x.reshape(b, n, num_heads, c // num_heads).transpose(1, 2)  # [B, H, N, d]


def _merge_heads(x: Tensor) -> Tensor:
    b, h, n, d = x.shape
    return x.transpose(1, 2).reshape(b, n, h * d)


def _linear_weight(layer: nn.Module) -> tuple[Tensor, Tensor]:
    """Float weight and bias of a Linear (or a dynamically quantised Linear)."""
    weight = layer.weight
    if callable(weight):  # torch.ao dynamic quantised Linear exposes weight() / bias()
        return weight().dequantize(), layer.bias()
    return weight, layer.bias


class _ConvT2x2(nn.Module):
    """A stride-2, kernel-2 ConvTranspose2d written as a per-pixel Linear plus a pixel shuffle.

    Equal to the convolution (the kernels do not overlap), and it lets dynamic int8 quantisation
    reach the decoder's heaviest per-prompt layers.
    """

    def __init__(self, conv: nn.ConvTranspose2d) -> None:
        super().__init__()
        cin, cout = conv.in_channels, conv.out_channels
        self.cout = cout
        self.linear = nn.Linear(cin, cout * 4)
        with torch.no_grad():
            # weight [cin, cout, 2, 2] -> rows ordered (cout, ky, kx)
            self.linear.weight.copy_(conv.weight.detach().reshape(cin, cout * 4).t())
            bias = conv.bias if conv.bias is not None else torch.zeros(cout)
            self.linear.bias.copy_(bias.detach().repeat_interleave(4))

    def forward(self, x: Tensor) -> Tensor:
        b, _, h, w = x.shape
        y = self.linear(x.permute(0, 2, 3, 1))  # [b, h, w, cout*4]
        y = y.reshape(b, h, w, self.cout, 2, 2).permute(0, 3, 1, 4, 2, 5)
        return y.reshape(b, self.cout, 2 * h, 2 * w)


@dataclass
class _ImageState:
    """Per-image, prompt-independent decoder inputs."""

    keys0: Tensor  # [1, N, C] image embedding + no-mask embedding, flattened
    pe: Tensor  # [1, N, C] dense positional encoding
    k0: Tensor  # [1, H, N, d] layer-0 token->image keys
    v0: Tensor  # [1, H, N, d] layer-0 token->image values
    q0: Tensor  # [1, H, N, d] layer-0 image->token queries
    high_res: list[Tensor]  # [feat_s0, feat_s1] (already through conv_s0/conv_s1)
    hw: tuple[int, int]  # embedding grid


class _Decoder(nn.Module):
    """SAM-2 MaskDecoder + TwoWayTransformer, re-associated around the prompt-independent image side."""

    def __init__(self, model: SAM2Base, int8: bool) -> None:
        super().__init__()
        dec = model.sam_mask_decoder
        self.prompt_encoder = model.sam_prompt_encoder
        self.transformer = dec.transformer
        self.s = 1 if dec.pred_obj_scores else 0
        if dec.pred_obj_scores:
            tokens = [dec.obj_score_token.weight, dec.iou_token.weight, dec.mask_tokens.weight]
        else:
            tokens = [dec.iou_token.weight, dec.mask_tokens.weight]
        self.register_buffer("output_tokens", torch.cat(tokens, dim=0).detach().clone())
        self.num_mask_tokens: int = dec.num_mask_tokens
        self.iou_head = dec.iou_prediction_head
        self.hyper = dec.output_hypernetworks_mlps
        self.use_high_res = bool(dec.use_high_res_features)
        dc1, ln1, act1, dc2, act2 = dec.output_upscaling
        self.dc1, self.ln1, self.act1, self.dc2, self.act2 = _ConvT2x2(dc1), ln1, act1, _ConvT2x2(dc2), act2
        if int8:
            # Quantise a private copy of the token-side / upscaling Linear layers; the image-side
            # matmuls below use dequantised weights because they are per-prompt bmm's.
            import copy

            from torch.ao.quantization import quantize_dynamic

            self.transformer = quantize_dynamic(copy.deepcopy(self.transformer), {nn.Linear}, torch.qint8)
            self.iou_head = quantize_dynamic(copy.deepcopy(self.iou_head), {nn.Linear}, torch.qint8)
            self.hyper = quantize_dynamic(copy.deepcopy(self.hyper), {nn.Linear}, torch.qint8)
            self.dc1 = quantize_dynamic(self.dc1, {nn.Linear}, torch.qint8)
            self.dc2 = quantize_dynamic(self.dc2, {nn.Linear}, torch.qint8)

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
            keys0=keys0,
            pe=pe,
            k0=_heads(t2i.k_proj(kpe), t2i.num_heads),
            v0=_heads(t2i.v_proj(keys0), t2i.num_heads),
            q0=_heads(i2t.q_proj(kpe), i2t.num_heads),
            high_res=high_res,
            hw=(h, w),
        )

    # ---- attention variants ----------------------------------------------------------------------
    @staticmethod
    def _tok2img_pre(attn: nn.Module, q_in: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """Tokens attend to the image with precomputed (prompt-independent) image keys/values."""
        q = _heads(attn.q_proj(q_in), attn.num_heads)
        p = torch.softmax(torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(q.shape[-1]), dim=-1)
        return attn.out_proj(_merge_heads(torch.matmul(p, v)))

    @staticmethod
    def _tok2img(attn: nn.Module, q_in: Tensor, xk: Tensor, xv: Tensor) -> Tensor:
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
        return attn.out_proj(_merge_heads(out))

    @staticmethod
    def _img2tok(attn: nn.Module, xq: Tensor | None, q_pre: Tensor | None, k_in: Tensor, v_in: Tensor) -> Tensor:
        """Image tokens attend to the prompt's tokens; out = P (v Wo^T) + bo avoids the 4096-row out_proj.

        Queries are either projected on the fly via x (Wq^T k^T) or precomputed (layer 0, `q_pre`).
        """
        nh = attn.num_heads
        k = _heads(attn.k_proj(k_in), nh)  # [B, H, T, d]
        v = _heads(attn.v_proj(v_in), nh)
        b, _, t, d = k.shape
        scale = 1.0 / math.sqrt(d)
        if q_pre is not None:
            scores = torch.einsum("hnd,bhtd->bnht", q_pre[0], k) * scale
            n = scores.shape[1]
        else:
            assert xq is not None
            wq, bq = _linear_weight(attn.q_proj)
            c = xq.shape[-1]
            a = torch.einsum("bhtd,hdc->bhtc", k, wq.view(nh, d, c)).reshape(b, nh * t, c) * scale
            ab = (k * bq.view(1, nh, 1, d)).sum(-1).reshape(b, 1, nh * t) * scale
            scores = torch.baddbmm(ab, xq, a.transpose(1, 2))
            n = scores.shape[1]
            scores = scores.view(b, n, nh, t)
        p = torch.softmax(scores, dim=-1).reshape(b, n, nh * t)
        wo, bo = _linear_weight(attn.out_proj)
        c_out = wo.shape[0]
        m = torch.einsum("bhtd,chd->bhtc", v, wo.view(c_out, nh, d)).reshape(b, nh * t, c_out)
        return torch.baddbmm(bo.view(1, 1, c_out), p, m)

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
                attn = self._tok2img(layer.cross_attn_token_to_image, q, keys + st.pe, keys)
            queries = layer.norm2(queries + attn)
            queries = layer.norm3(queries + layer.mlp(queries))
            q = queries + qpe
            if keys is None:
                upd = self._img2tok(layer.cross_attn_image_to_token, None, st.q0, q, queries)
                keys = layer.norm4(st.keys0 + upd)
            else:
                upd = self._img2tok(layer.cross_attn_image_to_token, keys + st.pe, None, q, queries)
                keys = layer.norm4(keys + upd)
        assert keys is not None
        attn = self._tok2img(tr.final_attn_token_to_image, queries + qpe, keys + st.pe, keys)
        hs = tr.norm_final_attn(queries + attn)
        iou = self.iou_head(hs[:, self.s])[:, 1:]  # multimask_output=True drops the single-mask token
        mask_tokens = hs[:, self.s + 1 : self.s + 1 + self.num_mask_tokens]
        return mask_tokens, keys, iou

    def upscale(self, st: _ImageState, mask_tokens: Tensor, keys: Tensor) -> Tensor:
        """Low-res (256x256) logits of the three multimask outputs for the given prompts."""
        b, _, c = keys.shape
        h, w = st.hw
        src = keys.transpose(1, 2).reshape(b, c, h, w)
        if self.use_high_res:
            feat_s0, feat_s1 = st.high_res
            up = self.act1(self.ln1(self.dc1(src) + feat_s1))
            up = self.act2(self.dc2(up) + feat_s0)
        else:
            up = self.act2(self.dc2(self.act1(self.ln1(self.dc1(src)))))
        hyper = torch.stack([self.hyper[i](mask_tokens[:, i]) for i in range(1, self.num_mask_tokens)], 1)
        bb, cc, hh, ww = up.shape
        return torch.bmm(hyper, up.reshape(bb, cc, hh * ww)).view(bb, -1, hh, ww)


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
        if int8 and self.device.type != "cpu":
            raise ValueError("int8 dynamic quantisation is CPU-only")
        self.decoder = _Decoder(model, int8=int8).eval()
        if half and self.device.type == "cuda":
            self.points_per_batch = len(self.grid)  # all points in one batch
        self._hole_filler: Any = None
        if min_mask_region_area > 0:
            from sam2.utils.transforms import SAM2Transforms

            self._hole_filler = SAM2Transforms(
                self.resolution, _MASK_THRESHOLD, min_mask_region_area, min_mask_region_area
            )
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
            coords = torch.full((self.points_per_batch, 1, 2), 10.0, device=self.device)
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
        with self._autocast():
            st = self._encode(image)
        points = torch.as_tensor(self.grid * np.array([[w, h]]), dtype=torch.float32)
        # Same coordinate transform as SAM2Transforms.transform_coords(normalize=True).
        in_points = points.clone()
        in_points[:, 0] = in_points[:, 0] / w
        in_points[:, 1] = in_points[:, 1] / h
        in_points = (in_points * self.resolution).to(self.device)

        low_hw = (st.hw[0] * 4, st.hw[1] * 4)
        ys = bilinear_axis(low_hw[0], h, self.device)
        xs = bilinear_axis(low_hw[1], w, self.device)
        covered = torch.zeros(h, w, dtype=torch.bool) if self.prune else None
        need_stab_now = self.stability_score_thresh > 0.0
        lo_thr = min(_MASK_THRESHOLD - _STABILITY_OFFSET, _MASK_THRESHOLD)

        cand_logits: list[Tensor] = []  # kept low-res logits (CPU) of candidates
        cand_iou: list[Tensor] = []
        cand_pts: list[Tensor] = []
        cand_stab: list[float] = []
        cand_boxes: list[list[int]] = []
        cand_region: list[tuple[int, int, int, int]] = []
        cand_bin: list[Tensor] = []  # binary crop inside region

        n = len(points)
        bs = self.points_per_batch
        for start in range(0, n, bs):
            idx = torch.arange(start, min(start + bs, n))
            if covered is not None:
                px = points[idx].long()
                px[:, 0].clamp_(0, w - 1)
                px[:, 1].clamp_(0, h - 1)
                idx = idx[~covered[px[:, 1], px[:, 0]]]
                if len(idx) == 0:
                    continue
            coords = in_points[idx][:, None, :]
            real = len(idx)
            if self._transformer_fn is not self.decoder.run_transformer and real < bs:
                coords = torch.cat([coords, coords[-1:].expand(bs - real, -1, -1)])  # fixed shape
            with self._autocast():
                mask_tokens, keys, iou = self._transformer_fn(st, coords)
                mask_tokens, keys, iou = mask_tokens[:real], keys[:real], iou[:real].float()
                keep = iou > self.pred_iou_thresh if self.pred_iou_thresh > 0.0 else torch.ones_like(iou, dtype=torch.bool)
                prompt_sel = keep.any(1).nonzero().flatten()
                if len(prompt_sel) == 0:
                    continue
                low = self.decoder.upscale(st, mask_tokens[prompt_sel], keys[prompt_sel]).float()
            keep_sel = keep[prompt_sel]
            low = low[keep_sel]  # [m, 256, 256], point-major then mask index (upstream order)
            iou_sel = iou[prompt_sel][keep_sel]
            pts_sel = points[idx[prompt_sel.cpu()]].repeat_interleave(3, 0)[keep_sel.flatten().cpu()]
            if self._hole_filler is not None:
                low = self._hole_filler.postprocess_masks(low[:, None], low.shape[-2:])[:, 0]
            low = low.cpu()
            for j in range(low.shape[0]):
                res = self._full_res(low[j], ys, xs, lo_thr, need_stab_now)
                if res is None:  # empty at full resolution
                    region, binary, stab, box = (0, 0, 0, 0), torch.zeros(0, 0, dtype=torch.bool), math.nan, [0, 0, 0, 0]
                else:
                    region, binary, stab, box = res
                if need_stab_now and not stab >= self.stability_score_thresh:
                    continue
                cand_logits.append(low[j])
                cand_iou.append(iou_sel[j].cpu())
                cand_pts.append(pts_sel[j])
                cand_stab.append(stab)
                cand_boxes.append(box)
                cand_region.append(region)
                cand_bin.append(binary)
                if covered is not None and binary.numel():
                    y0, y1, x0, x1 = region
                    covered[y0:y1, x0:x1] |= binary

        if not cand_iou:
            return []
        boxes = torch.tensor(cand_boxes, dtype=torch.float32)
        scores = torch.stack(cand_iou)
        order = batched_nms(boxes, scores, torch.zeros(len(boxes)), iou_threshold=self.box_nms_thresh)

        records: list[dict[str, Any]] = []
        for k in order.tolist():
            y0, y1, x0, x1 = cand_region[k]
            seg = np.zeros((h, w), dtype=bool)
            binary = cand_bin[k]
            if binary.numel():
                seg[y0:y1, x0:x1] = binary.numpy()
            stab = cand_stab[k]
            if not need_stab_now:
                stab = self._stability(cand_logits[k], ys, xs, lo_thr)
            bx = cand_boxes[k]
            records.append(
                {
                    "segmentation": seg,
                    "area": int(binary.sum()),
                    "bbox": [bx[0], bx[1], bx[2] - bx[0], bx[3] - bx[1]],
                    "predicted_iou": float(cand_iou[k]),
                    "point_coords": [cand_pts[k].tolist()],
                    "stability_score": float(stab),
                    "crop_box": [0, 0, w, h],
                }
            )
        return records

    # ---- full-resolution work, restricted to where it can matter ---------------------------------
    @staticmethod
    def _region(low: Tensor, ys: AxisMap, xs: AxisMap, thr: float) -> tuple[int, int, int, int] | None:
        """Output rectangle outside which every upsampled logit is <= thr (None: nothing above thr)."""
        above = low > thr
        rows = above.any(1).nonzero()
        if len(rows) == 0:
            return None
        cols = above.any(0).nonzero()
        y0, y1 = _axis_range(ys, int(rows[0]), int(rows[-1]))
        x0, x1 = _axis_range(xs, int(cols[0]), int(cols[-1]))
        if y0 >= y1 or x0 >= x1:
            return None
        return y0, y1, x0, x1

    def _full_res(
        self, low: Tensor, ys: AxisMap, xs: AxisMap, lo_thr: float, need_stab: bool
    ) -> tuple[tuple[int, int, int, int], Tensor, float, list[int]] | None:
        """Binary mask (inside its region), stability score and XYXY box of one candidate."""
        region = self._region(low, ys, xs, lo_thr if need_stab else _MASK_THRESHOLD)
        if region is None:
            return None
        y0, y1, x0, x1 = region
        up = upsample_region(low, ys, xs, y0, y1, x0, x1)
        binary = up > _MASK_THRESHOLD
        stab = math.nan
        if need_stab:
            inter = int((up > _MASK_THRESHOLD + _STABILITY_OFFSET).sum())
            union = int((up > _MASK_THRESHOLD - _STABILITY_OFFSET).sum())
            stab = inter / union if union else math.nan
        r = binary.any(1).nonzero()
        if len(r) == 0:
            return (y0, y1, x0, x1), binary, stab, [0, 0, 0, 0]
        c = binary.any(0).nonzero()
        box = [x0 + int(c[0]), y0 + int(r[0]), x0 + int(c[-1]), y0 + int(r[-1])]
        return (y0, y1, x0, x1), binary, stab, box

    def _stability(self, low: Tensor, ys: AxisMap, xs: AxisMap, lo_thr: float) -> float:
        region = self._region(low, ys, xs, lo_thr)
        if region is None:
            return math.nan
        up = upsample_region(low, ys, xs, *region)
        inter = int((up > _MASK_THRESHOLD + _STABILITY_OFFSET).sum())
        union = int((up > _MASK_THRESHOLD - _STABILITY_OFFSET).sum())
        return inter / union if union else math.nan
