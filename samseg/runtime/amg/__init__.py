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
    image->token output projection, bias and residual fold into one bmm; the image->token scores are laid
    out [B, N, T*H] so that the softmax over the 8 prompt tokens vectorises across the heads; later layers
    update the keys in place;
  * the positional encoding is never added to the per-prompt image tokens: its share of the scores,
    q (Wk pe)^T, is one small per-head bmm against a per-image projection of pe (with the bias terms
    riding along as a ones column);
  * the final token->image attention is per query token, so before the IoU filter it runs for the IoU
    token only; the three multimask tokens finish theirs (and the upscaling) only for prompts the filter
    kept — a rejected prompt skips 2 of the 7 per-prompt 4096-token matmuls; the IoU token's own scores
    ride as 8 extra columns in the last layer's image->token scores bmm (the last LayerNorm is affine per
    image token once native_layer_norm has its mean and rstd), so no separate pass over the final image
    tokens computes them;
  * on CPU (float32) SAM-2's two-layer transformer runs on factors (decoder.LowRankImage): every LayerNorm is
    affine per image token once its rstd is known, so each prompt's image tokens are written as per-image
    projections plus [4096, 64] attention-weight products, and the norms' variances are expanded the same
    way; no per-prompt 4096x256 tensor is built unless the prompt survives the IoU filter;
  * prompts run in chunks of 8 on CPU by default (points_per_batch; ~2 MB per prompt per factored tensor, so
    each block stays under glibc's mmap ceiling and is reused from the heap: see samseg.runtime.allocator and
    docs/performance-cpu.md), at most 16; survivors finish 4 at a time;
  * the image is encoded with SAM2ImagePredictor.set_image's maths but without building a predictor, whose
    constructor torch.jit.scripts its transforms (~1.3 s per generator on CPU);
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
  * box NMS runs before any full-size mask is materialised; candidates are kept bit-packed meanwhile
    (the dense path keeps only each mask's box) and survivors are painted within their box, on demand and
    one at a time (`GeneratedMask`: `dense()` / `packed_rows()`), with no RLE encode/decode round trip.
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

Layout: `geometry` (pure tensor helpers: bilinear geometry, cell-level statistics, painting), `decoder` (the
re-associated mask decoder), `generator` (FastMaskGenerator: grid, batches, filters, NMS, records), `output`
(GeneratedMask: a kept mask, full resolution on demand).
"""

from samseg.runtime.amg.generator import FastMaskGenerator
from samseg.runtime.amg.geometry import (
    CellGrid,
    CellMasks,
    bilinear_axis,
    boundary_fraction,
    cell_grid,
    cell_masks,
    dense_masks,
    paint_mask,
)
from samseg.runtime.amg.output import GeneratedMask

__all__ = [
    "CellGrid",
    "CellMasks",
    "FastMaskGenerator",
    "GeneratedMask",
    "bilinear_axis",
    "boundary_fraction",
    "cell_grid",
    "cell_masks",
    "dense_masks",
    "paint_mask",
]
