"""SAM-2's mask decoder re-associated for many prompts against one image (see samseg.runtime.amg for the maths).

Image-side work that does not depend on the prompt is done once per image; attention over the 4096 image tokens
projects the prompt's few tokens into image space instead of the image tokens into head space.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from samseg.runtime.amg.geometry import CellGrid
from samseg.runtime.amg.params import AmgParams

if TYPE_CHECKING:
    from sam2.modeling.sam2_base import SAM2Base


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
class ImageState:
    """Per-image, prompt-independent decoder inputs."""

    keys0: Tensor  # [1, N, C] image embedding + no-mask embedding, flattened
    pe: Tensor  # [1, N, C] dense positional encoding
    k0: Tensor  # [1, H, N, d] layer-0 token->image keys
    v0: Tensor  # [1, H, N, d] layer-0 token->image values
    q0: Tensor  # [1, H, N, d] layer-0 image->token queries
    high_res: list[Tensor]  # NHWC [feat_s0, feat_s1] (already through conv_s0/conv_s1)
    hw: tuple[int, int]  # embedding grid


@dataclass
class Frame:
    """Everything generate() shares between chunks of one image."""

    st: ImageState
    points: Tensor  # [P, 2] float32 grid points in image pixels (as upstream reports them)
    in_points: Tensor  # [P, 2] the same in the model's 1024-px input frame
    grid: CellGrid
    covered: Tensor | None  # pruning: low-res cells inside accepted masks
    params: AmgParams  # this image's grid and thresholds (a job's options)
    hole_filler: Any  # SAM2Transforms for min_mask_region_area > 0, else None


@dataclass
class Candidate:
    """A mask that passed the per-batch filters, kept compact (~10 kB) until NMS decides."""

    packed: np.ndarray  # packbits of the [R, C] cells wholly inside the mask, or of the mask's box crop
    pos_flat: Tensor | None  # flat indices of boundary pixels inside the mask; None: `packed` is the box crop
    box: list[int]  # XYXY, inclusive, as batched_mask_to_box
    area: int
    stability: float
    iou: float
    point: list[float]


class PromptDecoder(nn.Module):
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
    def image_state(self, image_embed: Tensor, high_res: list[Tensor]) -> ImageState:
        pe_grid = self.prompt_encoder.get_dense_pe()  # [1, C, h, w]
        no_mask = self.prompt_encoder.no_mask_embed.weight.reshape(1, -1, 1, 1)
        src = image_embed + no_mask
        _, _, h, w = src.shape
        keys0 = src.flatten(2).transpose(1, 2).contiguous()
        pe = pe_grid.flatten(2).transpose(1, 2).contiguous().to(keys0.dtype)
        layer0 = self.transformer.layers[0]
        t2i, i2t = layer0.cross_attn_token_to_image, layer0.cross_attn_image_to_token
        kpe = keys0 + pe
        return ImageState(
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
    def run_transformer(self, st: ImageState, coords: Tensor) -> tuple[Tensor, Tensor, Tensor]:
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

    def upscale(self, st: ImageState, mask_tokens: Tensor, keys: Tensor) -> Tensor:
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
