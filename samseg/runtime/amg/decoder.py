"""SAM-2's mask decoder re-associated for many prompts against one image (see samseg.runtime.amg for the maths).

Image-side work that does not depend on the prompt is done once per image; attention over the 4096 image tokens
projects the prompt's few tokens into image space instead of the image tokens into head space. On CPU float32 the
two-layer transformer goes further and never builds a prompt's 4096x256 image tokens before the IoU filter: they
are kept as factors (`LowRankImage`), per-image projections plus [4096, 64] attention-weight products.
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
    low_rank: LowRankImage | None  # the factored image side (CPU float32, two-layer transformers only), else None


@dataclass
class LowRankImage:
    """Per-image inputs of the two-layer transformer run on factors (`PromptDecoder._two_layers_low_rank`).

    Layer 0's image tokens are keys0 + P0 M0 (P0 [N, T*H] its image->token attention weights, M0 [T*H, C] the
    value rows through the out-projection), then LayerNorm(g1, beta1). A LayerNorm is affine per token once its
    rstd `a` is known, and each token's mean is P0's combination of M0's row means, so with keys0's own mean
    removed once per image:
        keys1 = a * (Y + P0 Q0) + beta1,   Y = (keys0 - mean) * g1,   Q0 = (M0 - row means) * g1,
    and a's variance is ||Xc + P0 M~0||^2 / C, expanded into per-image terms and [N, T*H] products. Every use of
    keys1 is a projection by a fixed weight W (per head, 16 channels) or by a prompt's few rows R, so
    keys1 W^T = a * (Y W^T + P0 (Q0 W^T)) + W beta1: Y W^T is per image, P0 (Q0 W^T) a [N, 64] x [64, .] product
    per prompt, where projecting keys1 itself reads [N, 256]. The last layer's tokens keys2 = LN(keys1 + P1 M1)
    follow the same way, so no [N, 256] tensor is built per prompt unless its masks are wanted (`image_tokens`).
    Names ending in `t` are centred per token (row mean removed); `ro` stacks two per-head projections.
    """

    yt: Tensor  # [N, C] Y centred
    yk: Tensor  # [H, d, N] Y Wk^T of layer 1's token->image attention, per head, transposed
    yv: Tensor  # [H, N, d] Y Wv^T of the same
    yq: Tensor  # [H, d, N] Y Wq^T of layer 1's image->token attention, transposed
    yo: Tensor  # [H, d+2, N] Y Wo^T of layer 1's image->token out-projection per head, Y.bo/H and -Y.1, transposed
    yf: Tensor  # [H, d+1, N] (Y g2) Wk^T of the final attention per head and -Y.1, transposed
    ro: Tensor  # [2H, d+1, N] Xc and Yt*g1 through layer 0's image->token out-projection, the same way
    q0: Tensor  # [H, d+1, N] ImageState.q0 transposed (layer 0's image->token queries)
    pq: Tensor  # [H, d+1, N] ImageState.pe_queries[0] transposed (layer 1's)
    kb: Tensor  # [H, d] Wk beta1 + bk (layer 1 token->image)
    vb: Tensor  # [H * d] Wv beta1 + bv (layer 1 token->image)
    qb: Tensor  # [H, d] Wq beta1 + bq (layer 1 image->token)
    beta1: Tensor  # [C]
    beta1t: Tensor  # [C]
    sums: Tensor  # [N, 6] per token: ||Xc||^2, ||Yt||^2, Yt.beta1t, Yt.g1, Y.1, ||beta1t||^2 (same in every row)


@dataclass
class LowRankPrompts:
    """A chunk's layer-0 factors of keys1 (see `LowRankImage`)."""

    a: Tensor  # [B, N] rstd of layer 0's last LayerNorm
    p: Tensor  # [B, T*H, N] layer 0's image->token attention weights, N innermost (see `_layer0_low_rank`)
    q0: Tensor  # [B, T*H, C] Q0 = (M0 - its row means) * g1
    qt: Tensor  # [B, T*H, C] Q0 centred
    k1sq: Tensor  # [B, N] ||keys1 - its mean||^2


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

    def __init__(self, model: SAM2Base, int8: bool, low_rank: bool = True) -> None:
        """`low_rank`: run SAM-2's two-layer transformer on factors (`LowRankImage`); exact up to float rounding,
        measured on CPU only, so the generator turns it on for CPU float32."""
        super().__init__()
        self.low_rank = low_rank
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
        q0 = _project_heads(i2t.q_proj, kpe, i2t.num_heads)
        pe_queries = [
            _project_heads(layer.cross_attn_image_to_token.q_proj, pe, layer.cross_attn_image_to_token.num_heads)
            for layer in tr.layers[1:]
        ]
        low_rank = None
        if self.low_rank and len(tr.layers) == 2:
            low_rank = self._low_rank_image(keys0[0], q0, pe_queries[0])
        return ImageState(
            keys0=_fresh(keys0),
            k0=_fresh(_heads(t2i.k_proj(kpe), t2i.num_heads)[0]),
            v0=_fresh(_heads(t2i.v_proj(keys0), t2i.num_heads)[0]),
            q0=q0,
            pe_keys=[_fresh(_project_heads(a.k_proj, pe, a.num_heads).transpose(1, 2)) for a in later],
            pe_queries=pe_queries,
            high_res=[f.permute(0, 2, 3, 1).contiguous() for f in high_res],
            hw=(h, w),
            low_rank=low_rank,
        )

    def _low_rank_image(self, x: Tensor, q0: Tensor, pq: Tensor) -> LowRankImage:
        """Per-image projections for the two-layer transformer on factors (see `LowRankImage`)."""
        tr = self.transformer
        l0, l1 = tr.layers
        norm = l0.norm4
        t2i, i2t = l1.cross_attn_token_to_image, l1.cross_attn_image_to_token
        g1, beta1 = norm.weight.detach().to(x.dtype), norm.bias.detach().to(x.dtype)
        xc = x - x.mean(-1, keepdim=True)
        y = xc * g1
        yt = y - y.mean(-1, keepdim=True)
        beta1t = beta1 - beta1.mean()
        wk, bk = _linear_weight(t2i.k_proj)
        wv, bv = _linear_weight(t2i.v_proj)
        wq, bq = _linear_weight(i2t.q_proj)
        wkf, _ = _linear_weight(tr.final_attn_token_to_image.k_proj)
        g2 = l1.norm4.weight.detach().to(x.dtype)
        minus_ysum = -y.sum(-1).view(1, 1, -1)

        def out_rows(attn: Any, z: Tensor) -> Tensor:
            # z M^T for value rows M = v Wo_h + bo/H: [H, d+1, N] z Wo_h^T per head, and z.bo/H as a last row
            wo, bo = _linear_weight(attn.out_proj)
            nh = attn.num_heads
            zo = _heads((z @ wo.to(z.dtype))[None], nh)[0]
            return torch.cat([zo, (z @ (bo / nh).to(z.dtype)).view(1, -1, 1).expand(nh, -1, 1)], -1).transpose(1, 2)

        i2t0 = l0.cross_attn_image_to_token
        sums = torch.stack(
            [
                (xc * xc).sum(-1),
                (yt * yt).sum(-1),
                yt @ beta1t,
                yt @ g1,
                y.sum(-1),
                (beta1t * beta1t).sum().expand(x.shape[0]),
            ],
            -1,
        )
        return LowRankImage(
            yt=_fresh(yt),
            yk=_fresh(_heads(F.linear(y[None], wk), t2i.num_heads)[0].transpose(1, 2)),
            yv=_fresh(_heads(F.linear(y[None], wv), t2i.num_heads)[0]),
            yq=_fresh(_heads(F.linear(y[None], wq), i2t.num_heads)[0].transpose(1, 2)),
            yo=_fresh(torch.cat([out_rows(i2t, y), minus_ysum.expand(i2t.num_heads, 1, -1)], 1)),
            yf=_fresh(
                torch.cat(
                    [
                        _heads(F.linear((y * g2)[None], wkf), tr.final_attn_token_to_image.num_heads)[0].transpose(
                            1, 2
                        ),
                        minus_ysum.expand(tr.final_attn_token_to_image.num_heads, 1, -1),
                    ],
                    1,
                )
            ),
            ro=_fresh(torch.cat([out_rows(i2t0, xc), out_rows(i2t0, yt * g1)])),
            q0=_fresh(q0.transpose(1, 2)),
            pq=_fresh(pq.transpose(1, 2)),
            kb=(F.linear(beta1, wk) + bk).view(t2i.num_heads, -1),
            vb=F.linear(beta1, wv) + bv,
            qb=(F.linear(beta1, wq) + bq).view(i2t.num_heads, -1),
            beta1=beta1,
            beta1t=beta1t,
            sums=_fresh(sums),
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
    def _tok2img_low_rank(attn: Any, q_in: Tensor, lr: LowRankPrompts, li: LowRankImage, pe_k: Tensor) -> Tensor:
        """Layer 1's token->image attention over keys1 = a * (Y + P0 Q0) + beta1, never reading keys1.

        scores = a * (q Wk Y^T + (q Wk Q0^T) P0^T) + q (Wk pe)^T + q.(Wk beta1 + bk): a per-head bmm against the
        per-image Y Wk^T (16 channels) and one [H*T, T*H] x [T*H, N] bmm per prompt, where q Wk keys1^T is a
        [H*T, C] x [C, N] bmm. out = ((P a) Y Wv^T) + ((P a) P0) (Q0 Wv^T) + Wv beta1 + bv, as softmax rows sum to 1.
        """
        nh = attn.num_heads
        b, t, _ = q_in.shape
        wk, _ = _linear_weight(attn.k_proj)
        wv, _ = _linear_weight(attn.v_proj)
        q = _heads(attn.q_proj(q_in), nh)  # [B, H, T, d]
        d, c = q.shape[-1], wk.shape[1]
        q = q * (1.0 / math.sqrt(d))
        qk = torch.einsum("bhtd,hdc->bhtc", q, wk.view(nh, d, c).to(q.dtype)).reshape(b, nh * t, c)
        qb = (q * li.kb.view(1, nh, 1, d).to(q.dtype)).sum(-1, keepdim=True)
        qh = q.transpose(0, 1).reshape(nh, b * t, d)
        qa = torch.cat([qh, qb.transpose(0, 1).reshape(nh, b * t, 1)], -1)
        n = li.yk.shape[-1]
        p0 = lr.p.to(qk.dtype)  # [B, T*H, N]
        scores = torch.bmm(torch.bmm(qk, lr.q0.transpose(1, 2).to(qk.dtype)), p0)  # [B, H*T, N]
        a = lr.a.view(b, 1, 1, n).to(scores.dtype)
        s4 = scores.view(b, nh, t, n).mul_(a)
        head_terms = torch.bmm(qh, li.yk.to(qh.dtype)).view(nh, b, t, n).mul_(a.view(1, b, 1, n))
        head_terms.view(nh, b * t, n).baddbmm_(qa, pe_k.to(qa.dtype))
        s4.add_(head_terms.transpose(0, 1))
        p = torch.softmax(scores, dim=-1)
        p.view(b, nh, t, n).mul_(a)
        ph = p.view(b, nh, t, n).transpose(0, 1).reshape(nh, b * t, n)
        out = torch.bmm(ph, li.yv.to(ph.dtype)).view(nh, b, t, d).transpose(0, 1)  # [B, H, T, d]
        z = torch.bmm(torch.bmm(p, p0.transpose(1, 2)), lr.q0.to(p.dtype)).view(b, nh, t, c)
        out = out + torch.einsum("bhtc,hdc->bhtd", z, wv.view(nh, d, c).to(z.dtype)) + li.vb.view(1, nh, 1, d)
        res: Tensor = attn.out_proj(_merge_heads(out.to(q_in.dtype)))
        return res

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
        b, _, c = x.shape
        px = torch.bmm(p, x.to(p.dtype)).view(b, nh, t, c)
        return PromptDecoder._t2i_values(attn, px)

    @staticmethod
    def _t2i_values(attn: Any, px: Tensor) -> Tensor:
        """Token->image output from P x [B, H, T, C], the attention-weighted image tokens: (P x) Wv^T + bv."""
        nh = attn.num_heads
        wv, bv = _linear_weight(attn.v_proj)
        c = px.shape[-1]
        d = wv.shape[0] // nh
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
    def run_transformer(self, st: ImageState, coords: Tensor) -> tuple[Tensor, Tensor, tuple[Tensor, ...], Tensor]:
        """Two-way transformer for B single-point prompts, as far as the IoU filter needs.

        Returns (queries, tokens, image, iou): the token states before the final attention, the prompt tokens
        (their positional encoding), the image tokens after the last layer (`image_tokens` builds them: a
        tuple of per-prompt tensors, indexed together by prompt), and the three multimask IoU predictions. The
        final token->image attention is per token, so only the IoU token's runs here; the mask tokens' runs in
        `mask_logits`, for the prompts that pass the filter.
        """
        labels = torch.ones(coords.shape[0], 1, dtype=torch.int, device=coords.device)
        sparse, _ = self.prompt_encoder(points=(coords, labels), boxes=None, masks=None)
        b = sparse.shape[0]
        tokens = torch.cat((self.output_tokens.unsqueeze(0).expand(b, -1, -1).to(sparse.dtype), sparse), 1)
        tr = self.transformer
        if st.low_rank is not None:
            queries, iou_attn, image = self._two_layers_low_rank(st, st.low_rank, tokens)
        else:
            queries, iou_attn, image = self._layers_materialised(st, tokens)
        iou_token = tr.norm_final_attn(queries[:, self.s : self.s + 1] + iou_attn)[:, 0]
        iou = self.iou_head(iou_token)[:, 1:]  # multimask_output=True drops the single-mask token
        return queries, tokens, image, iou

    def _layers_materialised(self, st: ImageState, tokens: Tensor) -> tuple[Tensor, Tensor, tuple[Tensor, ...]]:
        """Any depth, every prompt's image tokens built per layer (CUDA, autocast, transformers not of 2 layers).

        Returns (queries, the IoU token's final attention, (the last image tokens,))."""
        tr = self.transformer
        queries = tokens
        keys: Tensor | None = None  # None while the image side is still the shared keys0
        iou_attn: Tensor | None = None  # the IoU token's final attention, folded into the last layer
        for i, layer in enumerate(tr.layers):
            queries = self._token_side(layer, queries, tokens)
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
        return queries, iou_attn, (keys,)

    @staticmethod
    def _token_side(layer: Any, queries: Tensor, tokens: Tensor) -> Tensor:
        """A layer's self-attention over the prompt tokens, and its norm."""
        if layer.skip_first_layer_pe:
            out: Tensor = layer.norm1(layer.self_attn(q=queries, k=queries, v=queries))
            return out
        q = queries + tokens
        out = layer.norm1(queries + layer.self_attn(q=q, k=q, v=queries))
        return out

    @staticmethod
    def _i2t_kvm(attn: Any, k_in: Tensor, v_in: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Image->token keys (scaled) and values per head [B, H, T, d], and the value rows through the
        out-projection M [B, T*H, C] = v Wo_h + bo/H (each image token's weights sum to 1 per head)."""
        nh = attn.num_heads
        k = _heads(attn.k_proj(k_in), nh)
        v = _heads(attn.v_proj(v_in), nh)
        d = k.shape[-1]
        wo, bo = _linear_weight(attn.out_proj)
        c = wo.shape[0]
        m = torch.einsum("bhtd,chd->bthc", v, wo.view(c, nh, d).to(v.dtype)) + (bo / nh).view(1, 1, 1, c)
        return k * (1.0 / math.sqrt(d)), v, m.reshape(k.shape[0], -1, c)

    def _two_layers_low_rank(
        self, st: ImageState, li: LowRankImage, tokens: Tensor
    ) -> tuple[Tensor, Tensor, tuple[Tensor, ...]]:
        """SAM-2's two-layer transformer with every per-prompt image-token tensor kept as factors (`LowRankImage`).

        Returns (queries, the IoU token's final attention, the factors of the last image tokens)."""
        l0, l1 = self.transformer.layers
        queries = self._token_side(l0, tokens, tokens)
        attn = self._tok2img_first(l0.cross_attn_token_to_image, queries + tokens, st.k0, st.v0)
        queries = l0.norm2(queries + attn)
        queries = l0.norm3(queries + l0.mlp(queries))
        lr = self._layer0_low_rank(st, li, l0, queries + tokens, queries)
        queries = self._token_side(l1, queries, tokens)
        attn = self._tok2img_low_rank(l1.cross_attn_token_to_image, queries + tokens, lr, li, st.pe_keys[0])
        queries = l1.norm2(queries + attn)
        queries = l1.norm3(queries + l1.mlp(queries))
        iou_attn, image = self._last_layer_low_rank(st, li, lr, l1, queries, tokens)
        return queries, iou_attn, image

    @staticmethod
    def _layer0_low_rank(st: ImageState, li: LowRankImage, layer: Any, k_in: Tensor, v_in: Tensor) -> LowRankPrompts:
        """Layer 0's image->token attention and LayerNorm as keys1's factors: P0, Q0 and the rstd `a`.

        With Xc = keys0 - mean and M~0 = M0 - row means, the norm's input minus its mean is Xc + P0 M~0, so
            C var = ||Xc||^2 + 2 P0.(Xc M0^T) + P0.(P0 M~0 M~0^T)   (row-wise dots; Xc's rows sum to 0),
        where Xc M0^T is a per-head bmm against the per-image Xc Wo^T. ||keys1 - mean||^2, which the last norm's
        variance needs, expands the same way with Yt = Y - mean and Q~0 = Q0 - row means.
        Every [N, .] tensor here is laid out [B, rows, N], N innermost, so the softmax over each head's tokens, the
        row-wise dots and the permutations of the head-major bmm outputs all vectorise along N (laid out
        [B, N, rows] first, the dot against the [H, N, B, T] bmm output alone took ~1.4 ms per prompt on CPU).
        """
        attn = layer.cross_attn_image_to_token
        nh = attn.num_heads
        k, v, m = PromptDecoder._i2t_kvm(attn, k_in, v_in)
        b, _, t, d = k.shape
        th = t * nh
        n = li.q0.shape[-1]
        _, bq = _linear_weight(attn.q_proj)
        kb = (k * bq.view(1, nh, 1, d).to(k.dtype)).sum(-1, keepdim=True)
        ka = torch.cat([k, kb], -1).transpose(0, 1).reshape(nh, b * t, d + 1)
        scores = torch.bmm(ka, li.q0.to(ka.dtype)).view(nh, b, t, n).permute(1, 2, 0, 3).reshape(b, t, nh, n)
        p = torch.softmax(scores, dim=1).view(b, th, n)
        norm = layer.norm4
        g1 = norm.weight.to(m.dtype)
        mrow = m.mean(-1, keepdim=True)  # [B, T*H, 1]
        mt = m - mrow
        q0 = mt * g1
        qt = q0 - q0.mean(-1, keepdim=True)
        grams = torch.cat(
            [mt @ mt.transpose(1, 2), qt @ qt.transpose(1, 2), (qt @ li.beta1t.to(qt.dtype)).unsqueeze(1), mrow.mT], 1
        )
        pg = torch.bmm(grams, p)  # [B, 2*T*H + 2, N]
        quads = (pg[:, : 2 * th].view(b, 2, th, n) * p.view(b, 1, th, n)).sum(2)  # [B, 2, N]
        # P0.(Xc M0^T) and P0.((Yt g1) M0^T): head-major bmm rows ordered (token, prompt), so that the products
        # with P0 sum over (head, token) as one contiguous dimension
        vv = torch.cat([v, torch.ones_like(v[..., :1])], -1).permute(1, 2, 0, 3).reshape(nh, t * b, d + 1)
        rr = torch.bmm(vv.repeat(2, 1, 1), li.ro.to(vv.dtype)).view(2, nh, t, b, n)
        cross = rr.mul_(p.view(b, t, nh, n).permute(2, 1, 0, 3)).view(2, th, b, n).sum(1)  # [2, B, N]
        sums = li.sums.to(p.dtype)
        c = m.shape[-1]
        a = torch.rsqrt((sums[:, 0] + 2 * cross[0] + quads[:, 0]) / c + norm.eps)  # [B, N]
        w = sums[:, 1] + 2 * (cross[1] - sums[:, 3] * pg[:, 2 * th + 1]) + quads[:, 1]  # ||Yt + P0 Q~0||^2
        k1sq = a * a * w + 2 * a * (sums[:, 2] + pg[:, 2 * th]) + sums[:, 5]
        return LowRankPrompts(a=a, p=p, q0=q0, qt=qt, k1sq=k1sq)

    def _last_layer_low_rank(
        self, st: ImageState, li: LowRankImage, lr: LowRankPrompts, layer: Any, queries: Tensor, tokens: Tensor
    ) -> tuple[Tensor, tuple[Tensor, ...]]:
        """The last layer's image->token attention and norm, and the IoU token's final attention, on factors.

        Image->token scores: a * (Y (Wq^T k^T) + P0 (Q0 Wq^T k^T)) + (Wq pe) k^T + (Wq beta1 + bq).k. The last
        norm's input minus its mean is z = k~1 + P1 M~1 (k~1 = keys1 - mean), so
            C var2 = ||k~1||^2 + 2 P1.(keys1 M~1^T) + P1.(P1 M~1 M~1^T),
        and the IoU token's final scores are rstd2 * (keys1 E~^T + (E~ M~1^T) P1^T) + A.beta2 + pe terms (A its
        query through Wk, E~ = g2 * A centred), as in `_last_layer_and_iou_attention`. keys1 M~1^T and keys1 E~^T
        are extra rows in the scores' [N, T*H] x [T*H, .] product. The attention's output is
        P_f keys2 = (R k~1 + (R P1) M~1) * g2 + beta2 with R = P_f * rstd2, whose k~1 term is (R a) Yt +
        ((R a) P0) Q~0 + sum(R) beta1~. Returns (that attention's output, the factors for `image_tokens`).
        """
        tr = self.transformer
        attn, final = layer.cross_attn_image_to_token, tr.final_attn_token_to_image
        nh = attn.num_heads
        k, v, m = self._i2t_kvm(attn, queries + tokens, queries)
        b, _, t, d = k.shape
        th = t * nh
        c = m.shape[-1]
        n = li.yt.shape[0]
        wq, _ = _linear_weight(attn.q_proj)
        which = slice(self.s, self.s + 1)
        qk_f, qa_f = self._t2i_query(final, queries[:, which] + tokens[:, which])  # [B, H, C], [H, B, d+1]
        hf = qk_f.shape[1]
        norm = layer.norm4
        g2, beta2 = norm.weight.to(m.dtype), norm.bias.to(m.dtype)
        e = qk_f * g2
        e_mean = e.mean(-1, keepdim=True)  # [B, H, 1]
        e = e - e_mean
        mrow = m.mean(-1, keepdim=True)
        mt = m - mrow
        rows = torch.einsum("bhtd,hdc->bthc", k, wq.view(nh, d, c).to(k.dtype)).reshape(b, th, c)
        rows = torch.cat([rows, e.to(rows.dtype), mt.to(rows.dtype)], 1)
        p0 = lr.p.to(rows.dtype)  # [B, T*H, N]
        buf = torch.bmm(torch.bmm(rows, lr.q0.to(rows.dtype).transpose(1, 2)), p0)
        scores, xe, xm = buf[:, :th], buf[:, th : th + hf], buf[:, th + hf :]  # [B, ., N]
        # Y E~^T = (Y g2) Wk^T q - (Y.1) mean(E), per head
        qf = torch.cat([qa_f[..., :-1], e_mean.transpose(0, 1)], -1)  # [H, B, d+1]
        xe.add_(torch.bmm(qf, li.yf.to(qf.dtype)).transpose(0, 1))
        # Y M~1^T = Y M1^T - (Y.1) (M1's row means), per head
        ones = torch.ones_like(v[..., :1])
        vv = torch.cat([v, ones, mrow.view(b, t, nh, 1).transpose(1, 2)], -1).transpose(0, 1).reshape(nh, b * t, d + 2)
        xm.view(b, t, nh, n).add_(torch.bmm(vv, li.yo.to(vv.dtype)).view(nh, b, t, n).permute(1, 2, 0, 3))
        a = lr.a.to(buf.dtype)
        buf.mul_(a.unsqueeze(1))
        kb = (k * li.qb.view(1, nh, 1, d).to(k.dtype)).sum(-1, keepdim=True)
        ka = torch.cat([k, kb], -1).transpose(0, 1).reshape(nh, b * t, d + 1)
        head_terms = torch.bmm(ka[..., :d], li.yq.to(k.dtype)).view(nh, b, t, n).mul_(a.view(1, b, 1, n))
        head_terms.view(nh, b * t, n).baddbmm_(ka, li.pq.to(ka.dtype))
        scores.view(b, t, nh, n).add_(head_terms.permute(1, 2, 0, 3))
        beta1 = li.beta1.to(e.dtype)
        xe.add_((e @ beta1).unsqueeze(-1))
        xm.add_((mt @ beta1).unsqueeze(-1))
        p1 = torch.softmax(scores.view(b, t, nh, n), dim=1).view(b, th, n)
        pm = torch.bmm(mt @ mt.transpose(1, 2), p1)
        var2 = (lr.k1sq + 2 * (p1 * xm).sum(1) + (p1 * pm).sum(1)) / c
        rstd2 = torch.rsqrt(var2 + norm.eps)  # [B, N]
        s = torch.bmm(e @ mt.transpose(1, 2), p1).add_(xe).mul_(rstd2.unsqueeze(1))  # [B, H, N]
        s.add_((qk_f * beta2).sum(-1, keepdim=True))
        s.add_(torch.bmm(qa_f, st.pe_keys[-1].to(qa_f.dtype)).view(nh, b, n).transpose(0, 1))
        r = torch.softmax(s, dim=-1).mul_(rstd2.unsqueeze(1))
        ra = r * lr.a.unsqueeze(1)
        z = torch.mm(ra.reshape(b * hf, n), li.yt.to(ra.dtype)).view(b, hf, c)
        z.baddbmm_(torch.bmm(ra, p0.transpose(1, 2)), lr.qt).baddbmm_(torch.bmm(r, p1.transpose(1, 2)), mt)
        z.add_(r.sum(-1, keepdim=True) * li.beta1t.to(z.dtype))
        px = (z * g2 + beta2).view(b, hf, 1, c)
        return self._t2i_values(final, px), (lr.a, lr.p, lr.qt, p1, mt, rstd2)

    def image_tokens(self, st: ImageState, image: tuple[Tensor, ...]) -> Tensor:
        """The last layer's image tokens [B, N, C] from `run_transformer`'s `image` (already the tokens, or the
        factors keys2 = rstd2 * (a * (Yt + P0 Q~0) + beta1~ + P1 M~1) * g2 + beta2 of the low-rank path)."""
        if len(image) == 1:
            return image[0]
        assert st.low_rank is not None
        a, p0, qt, p1, mt, rstd2 = image
        norm = self.transformer.layers[-1].norm4
        li = st.low_rank
        keys = torch.baddbmm(li.yt.expand(a.shape[0], -1, -1), p0.transpose(1, 2), qt)
        keys.mul_(a.unsqueeze(-1)).add_(li.beta1t).baddbmm_(p1.transpose(1, 2), mt)
        keys.mul_(rstd2.unsqueeze(-1)).mul_(norm.weight).add_(norm.bias)
        return keys

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

    def mask_logits(self, st: ImageState, queries: Tensor, tokens: Tensor, image: tuple[Tensor, ...]) -> Tensor:
        """Low-res (256x256) logits of the three multimask outputs for the given prompts.

        Finishes the mask tokens' final attention, then upscales channels-last (NHWC): keys already are,
        LayerNorm2d becomes a plain layer_norm over the last dim, and oneDNN's transposed convolutions are ~3x
        faster than on NCHW.
        """
        keys = self.image_tokens(st, image)
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
