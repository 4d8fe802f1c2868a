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


def _with_ones(x: Tensor) -> Tensor:
    """[..., d] -> [..., d+1] with a ones column: a per-row bias rides along in the same bmm."""
    return torch.cat([x, torch.ones_like(x[..., :1])], -1)


def _project_heads(layer: Any, x: Tensor, num_heads: int) -> Tensor:
    """[1, N, C] -> [H, N, d+1]: x through a Linear's weight only (its bias is added per prompt token), split into
    heads, with a ones column (see `_with_ones`)."""
    weight, _ = _linear_weight(layer)
    return _fresh(_with_ones(_heads(F.linear(x, weight), num_heads)[0]))


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
    """Per-image, prompt-independent decoder inputs (head-split tensors are [H, ...], shared by every prompt)."""

    keys0: Tensor  # [1, N, C] image embedding + no-mask embedding, flattened
    k0: Tensor  # [H, N, d] layer-0 token->image keys
    v0: Tensor  # [H, N, d] layer-0 token->image values
    q0: Tensor  # [H, N, d+1] layer-0 image->token queries without their bias, and a ones column
    pe_keys: list[Tensor]  # [H, d+1, N] per later layer, then the final attention: Wk . pe, and a ones row
    pe_queries: list[Tensor]  # [H, N, d+1] per later layer: Wq . pe, and a ones column
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
        tr = self.transformer
        t2i, i2t = tr.layers[0].cross_attn_token_to_image, tr.layers[0].cross_attn_image_to_token
        kpe = keys0 + pe
        later = [layer.cross_attn_token_to_image for layer in tr.layers[1:]] + [tr.final_attn_token_to_image]
        return ImageState(
            keys0=_fresh(keys0),
            k0=_fresh(_heads(t2i.k_proj(kpe), t2i.num_heads)[0]),
            v0=_fresh(_heads(t2i.v_proj(keys0), t2i.num_heads)[0]),
            q0=_project_heads(i2t.q_proj, kpe, i2t.num_heads),
            pe_keys=[_fresh(_project_heads(a.k_proj, pe, a.num_heads).transpose(1, 2)) for a in later],
            pe_queries=[
                _project_heads(layer.cross_attn_image_to_token.q_proj, pe, layer.cross_attn_image_to_token.num_heads)
                for layer in tr.layers[1:]
            ],
            high_res=[f.permute(0, 2, 3, 1).contiguous() for f in high_res],
            hw=(h, w),
        )

    # ---- attention variants ----------------------------------------------------------------------
    # Shapes: B prompts, T tokens per prompt, N image tokens, C channels, H heads of d channels.
    @staticmethod
    def _tok2img_first(attn: Any, q_in: Tensor, k0: Tensor, v0: Tensor) -> Tensor:
        """Layer 0: tokens attend to the shared image keys/values, heads as the batch (no per-prompt copies)."""
        nh = attn.num_heads
        b, t, _ = q_in.shape
        q = _heads(attn.q_proj(q_in), nh)  # [B, H, T, d]
        d = q.shape[-1]
        qh = q.transpose(0, 1).reshape(nh, b * t, d) * (1.0 / math.sqrt(d))
        p = torch.softmax(torch.bmm(qh, k0.transpose(1, 2).to(qh.dtype)), dim=-1)  # [H, B*T, N]
        out = torch.bmm(p, v0.to(p.dtype)).view(nh, b, t, d).permute(1, 2, 0, 3).reshape(b, t, nh * d)
        res: Tensor = attn.out_proj(out)
        return res

    @staticmethod
    def _tok2img(attn: Any, q_in: Tensor, x: Tensor, pe_k: Tensor) -> Tensor:
        """Tokens attend to per-prompt image tokens `x` (+ positional encoding) without projecting the N tokens.

        scores = (q Wk) x^T + q (Wk pe)^T + q.bk: the first term is one [H*T, C] x [C, N] bmm per prompt, the
        positional and bias terms one small bmm against the per-image `pe_k`; out = (P x) Wv^T + bv because
        softmax rows sum to 1. x + pe is never materialised.
        """
        nh = attn.num_heads
        b, t, _ = q_in.shape
        qk, qa = PromptDecoder._t2i_query(attn, q_in)
        n = x.shape[1]
        pos = torch.bmm(qa, pe_k.to(qa.dtype)).view(nh, b, t, n)  # [H, B, T, N]
        scores = pos.transpose(0, 1).reshape(b, nh * t, n)  # a copy in whole rows, owned: filled in place
        p = torch.softmax(scores.baddbmm_(qk.to(scores.dtype), x.transpose(1, 2).to(scores.dtype)), dim=-1)
        return PromptDecoder._t2i_output(attn, p, x, t)

    @staticmethod
    def _t2i_query(attn: Any, q_in: Tensor) -> tuple[Tensor, Tensor]:
        """Token->image queries [B, T, C] -> (qk [B, H*T, C]: each head's scaled query through Wk, so that scores
        are qk . x^T; qa [H, B*T, d+1]: the scaled query with its bias term q.bk, for the bmm against `pe_k`)."""
        nh = attn.num_heads
        wk, bk = _linear_weight(attn.k_proj)
        b, t, c = q_in.shape
        q = _heads(attn.q_proj(q_in), nh)  # [B, H, T, d]
        d = q.shape[-1]
        q = q * (1.0 / math.sqrt(d))
        qk = torch.einsum("bhtd,hdc->bhtc", q, wk.view(nh, d, c).to(q.dtype)).reshape(b, nh * t, c)
        qb = (q * bk.view(1, nh, 1, d)).sum(-1, keepdim=True)
        qa = torch.cat([q, qb], -1).transpose(0, 1).reshape(nh, b * t, d + 1)
        return qk, qa

    @staticmethod
    def _t2i_output(attn: Any, p: Tensor, x: Tensor, t: int) -> Tensor:
        """Token->image output from the attention weights `p` [B, H*T, N] (rows sum to 1): (P x) Wv^T + bv."""
        nh = attn.num_heads
        wv, bv = _linear_weight(attn.v_proj)
        b, _, c = x.shape
        d = wv.shape[0] // nh
        px = torch.bmm(p, x.to(p.dtype)).view(b, nh, t, c)
        out = torch.einsum("bhtc,hdc->bhtd", px, wv.view(nh, d, c).to(px.dtype)) + bv.view(1, nh, 1, d)
        res: Tensor = attn.out_proj(_merge_heads(out))
        return res

    @staticmethod
    def _img2tok(
        attn: Any,
        residual: Tensor,
        x: Tensor | None,
        pos_q: Tensor,
        k_in: Tensor,
        v_in: Tensor,
        extra: Tensor | None = None,
    ) -> tuple[Tensor, Tensor | None, Tensor, Tensor]:
        """`residual` + image tokens attending to the prompt's tokens, without any N-row projection.

        Scores are laid out [B, N, T*H] (token-major): x (Wq^T k^T) + (Wq pe) k^T + bq.k, the last two one small
        bmm against the per-image `pos_q` (layer 0, x is None: `pos_q` is the image's own queries and that bmm is
        all). The softmax over each head's T tokens then runs over a strided dim whose inner dim is the H heads,
        which vectorises (measured alone: 0.28 vs 0.48 ms per prompt for a softmax over contiguous rows of 8).
        The output P (v Wo^T + bo/H) folds the out-projection, its bias (each image token's weights sum to 1 per
        head) and the residual into one bmm.
        Later layers update `residual` (the previous layer's keys, no longer needed) in place.

        Returns (the updated image tokens, x . extra^T [B, N, E] when `extra` [B, E, C] is given, P [B, N, T*H],
        M [B, T*H, C]) so that the caller can finish work that depends on x without another pass over it: the
        extra rows ride in the scores' bmm, which reads x anyway.
        """
        nh = attn.num_heads
        k = _heads(attn.k_proj(k_in), nh)  # [B, H, T, d]
        v = _heads(attn.v_proj(v_in), nh)
        b, _, t, d = k.shape
        k = k * (1.0 / math.sqrt(d))
        wq, bq = _linear_weight(attn.q_proj)
        c = residual.shape[-1]
        n = pos_q.shape[1]
        kb = (k * bq.view(1, nh, 1, d)).sum(-1, keepdim=True)
        ka = torch.cat([k, kb], -1).permute(1, 3, 0, 2).reshape(nh, d + 1, b * t)
        pos = torch.bmm(pos_q.to(ka.dtype), ka).view(nh, n, b, t)  # [H, N, B, T]
        x_extra: Tensor | None = None
        if extra is None:
            scores = pos.permute(2, 1, 3, 0).reshape(b, n, t * nh)  # a copy, owned: filled in place
            buf = scores
        else:
            e = extra.shape[1]
            buf = torch.empty(b, n, t * nh + e, dtype=pos.dtype, device=pos.device)
            scores = buf[..., : t * nh]
            scores.view(b, n, t, nh).copy_(pos.permute(2, 1, 3, 0))
            buf[..., t * nh :].zero_()
            x_extra = buf[..., t * nh :]
        if x is not None:
            a = torch.einsum("bhtd,hdc->bthc", k, wq.view(nh, d, c).to(k.dtype)).reshape(b, t * nh, c)
            if extra is not None:
                a = torch.cat([a, extra.to(a.dtype)], 1)
            buf.baddbmm_(x.to(buf.dtype), a.transpose(1, 2).to(buf.dtype))
        p = torch.softmax(scores.view(b, n, t, nh), dim=2).view(b, n, t * nh)  # over each head's tokens
        wo, bo = _linear_weight(attn.out_proj)
        m = torch.einsum("bhtd,chd->bthc", v, wo.view(c, nh, d).to(v.dtype)) + (bo / nh).view(1, 1, 1, c)
        m = m.reshape(b, t * nh, c).to(p.dtype)
        if x is None:
            return torch.baddbmm(residual.expand(b, -1, -1).to(p.dtype), p, m), x_extra, p, m
        return residual.baddbmm_(p.to(residual.dtype), m.to(residual.dtype)), x_extra, p, m

    # ---- per batch -------------------------------------------------------------------------------
    def run_transformer(self, st: ImageState, coords: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Two-way transformer for B single-point prompts, as far as the IoU filter needs.

        Returns (queries, tokens, keys, iou): the token states before the final attention, the prompt tokens
        (their positional encoding), the image tokens after the last layer, and the three multimask IoU
        predictions. The final token->image attention is per token, so only the IoU token's runs here; the
        mask tokens' runs in `mask_logits`, for the prompts that pass the filter.
        """
        labels = torch.ones(coords.shape[0], 1, dtype=torch.int, device=coords.device)
        sparse, _ = self.prompt_encoder(points=(coords, labels), boxes=None, masks=None)
        b = sparse.shape[0]
        tokens = torch.cat((self.output_tokens.unsqueeze(0).expand(b, -1, -1).to(sparse.dtype), sparse), 1)
        tr = self.transformer
        queries = tokens
        keys: Tensor | None = None  # None while the image side is still the shared keys0
        iou_attn: Tensor | None = None  # the IoU token's final attention, folded into the last layer
        for i, layer in enumerate(tr.layers):
            if layer.skip_first_layer_pe:
                queries = layer.self_attn(q=queries, k=queries, v=queries)
            else:
                q = queries + tokens
                queries = queries + layer.self_attn(q=q, k=q, v=queries)
            queries = layer.norm1(queries)
            q = queries + tokens
            t2i, i2t = layer.cross_attn_token_to_image, layer.cross_attn_image_to_token
            if keys is None:
                attn = self._tok2img_first(t2i, q, st.k0, st.v0)
            else:
                attn = self._tok2img(t2i, q, keys, st.pe_keys[i - 1])
            queries = layer.norm2(queries + attn)
            queries = layer.norm3(queries + layer.mlp(queries))
            q = queries + tokens
            if keys is None:
                keys = layer.norm4(self._img2tok(i2t, st.keys0, None, st.q0, q, queries)[0])
            elif i < len(tr.layers) - 1:
                keys = layer.norm4(self._img2tok(i2t, keys, keys, st.pe_queries[i - 1], q, queries)[0])
            else:
                keys, iou_attn = self._last_layer_and_iou_attention(st, layer, queries, tokens, keys)
        assert keys is not None
        if iou_attn is None:  # a one-layer transformer: no later layer to fold it into
            iou_attn = self._final_attention(st, queries, tokens, keys, slice(self.s, self.s + 1))
        iou_token = tr.norm_final_attn(queries[:, self.s : self.s + 1] + iou_attn)[:, 0]
        iou = self.iou_head(iou_token)[:, 1:]  # multimask_output=True drops the single-mask token
        return queries, tokens, keys, iou

    def _last_layer_and_iou_attention(
        self, st: ImageState, layer: Any, queries: Tensor, tokens: Tensor, keys: Tensor
    ) -> tuple[Tensor, Tensor]:
        """The last layer's image->token attention and norm, and the IoU token's final token->image attention.

        The final attention's scores are s = q_f Wk (LN(y) + pe)^T + q_f.bk per head, with y = keys + P M the
        last layer's update. LayerNorm is affine per image token once its mean and rstd are known, so with
        A = q_f Wk (one row per head) and g, beta the norm's weight and bias:
            LN(y) A^T = rstd * (keys (g*A)^T + P (M (g*A)^T) - mean * (g.A)) + beta.A
        keys (g*A)^T rides as H extra columns in the layer's own scores bmm, which reads `keys` anyway, and
        native_layer_norm returns mean and rstd; this replaces a separate pass over LN(y) for H rows of scores
        (~0.7 ms per prompt on 2 CPU cores). Exact up to float rounding (tested against SAM-2's MaskDecoder).
        """
        tr = self.transformer
        i2t, final = layer.cross_attn_image_to_token, tr.final_attn_token_to_image
        which = slice(self.s, self.s + 1)
        qk_f, qa_f = self._t2i_query(final, queries[:, which] + tokens[:, which])  # [B, H, C], [H, B, d+1]
        norm = layer.norm4
        g, beta = norm.weight, norm.bias
        ga = qk_f * g.to(qk_f.dtype)
        y, kga, p, m = self._img2tok(i2t, keys, keys, st.pe_queries[-1], queries + tokens, queries, extra=ga)
        assert kga is not None
        c = y.shape[-1]
        keys2, mean, rstd = torch.native_layer_norm(y, (c,), g, beta, norm.eps)
        # Laid out [B, H, N]: the (g*A) M^T P^T bmm is ~5x faster with N as its output's inner dimension.
        s = torch.baddbmm(kga.transpose(1, 2), torch.bmm(ga.to(m.dtype), m.transpose(1, 2)), p.transpose(1, 2))
        s.addcmul_(mean.transpose(1, 2).to(s.dtype), ga.sum(-1, keepdim=True).to(s.dtype), value=-1.0)
        s.mul_(rstd.transpose(1, 2).to(s.dtype)).add_((qk_f * beta.to(qk_f.dtype)).sum(-1, keepdim=True).to(s.dtype))
        b, nh, n = s.shape
        s.add_(torch.bmm(qa_f, st.pe_keys[-1].to(qa_f.dtype)).view(nh, b, n).transpose(0, 1).to(s.dtype))
        return keys2, self._t2i_output(final, torch.softmax(s, dim=-1), keys2, 1)

    def _final_attention(self, st: ImageState, queries: Tensor, tokens: Tensor, keys: Tensor, which: slice) -> Tensor:
        """The final token->image attention for the tokens in `which` only (attention is per query)."""
        tr = self.transformer
        q = queries[:, which]
        return self._tok2img(tr.final_attn_token_to_image, q + tokens[:, which], keys, st.pe_keys[-1])

    def mask_logits(self, st: ImageState, queries: Tensor, tokens: Tensor, keys: Tensor) -> Tensor:
        """Low-res (256x256) logits of the three multimask outputs for the given prompts.

        Finishes the mask tokens' final attention, then upscales channels-last (NHWC): keys already are,
        LayerNorm2d becomes a plain layer_norm over the last dim, and oneDNN's transposed convolutions are ~3x
        faster than on NCHW.
        """
        first = self.s + 2  # the multimask tokens: after the IoU token and the single-mask token
        which = slice(first, first + self.num_mask_tokens - 1)
        attn = self._final_attention(st, queries, tokens, keys, which)
        mask_tokens = self.transformer.norm_final_attn(queries[:, which] + attn)
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
        hyper = torch.stack([self.hyper[i](mask_tokens[:, i - 1]) for i in range(1, self.num_mask_tokens)], 1)
        _, hh, ww, cc = x.shape
        masks = torch.bmm(x.reshape(b, hh * ww, cc), hyper.transpose(1, 2).to(x.dtype))
        return masks.transpose(1, 2).reshape(b, -1, hh, ww)
