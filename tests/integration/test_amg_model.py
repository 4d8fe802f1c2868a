"""samseg.runtime.amg.FastMaskGenerator agrees with upstream SAM2AutomaticMaskGenerator (issue 5).

Meta's SAM-2 weights cannot be downloaded here, so a randomly initialised tiny checkpoint (built once
per session with the real model code) stands in for them; both generators get the same weights, the
same image and the same point grid. Random weights give near-zero, noisy mask logits, which is the
hardest case for agreement (many pixels sit next to the 0 threshold). No timing is asserted.

Integration tier, though in-process: eight image-encoder passes of the real model (fp16 and int8 among them)
cost minutes of CPU on a loaded 2-core machine. The generator's pure helpers are tests/unit/test_amg.py.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

from samseg.runtime.amg import FastMaskGenerator

MODEL = "sam2.1_hiera_tiny"
POINTS = 4
REGIMES: dict[str, dict[str, float]] = {
    "filters_off": {"pred_iou_thresh": 0.0, "stability_score_thresh": 0.0, "box_nms_thresh": 1.0},
    # SAM-2's default thresholds (IoU 0.8, stability 0.95, NMS 0.7) — on the `confident` model: random weights
    # keep no mask at these (IoU ~0.54), which would compare 0 masks with 0.
    "defaults": {},
    # Random weights predict IoU ~0.54: this threshold keeps some masks and exercises IoU filter + NMS.
    "iou_and_nms": {"pred_iou_thresh": 0.54, "stability_score_thresh": 0.0, "box_nms_thresh": 0.7},
}


@pytest.fixture(scope="session")
def model(tmp_path_factory: pytest.TempPathFactory) -> Any:
    from samseg.runtime.build import build_model, write_random_checkpoint

    ckpt = write_random_checkpoint(MODEL, tmp_path_factory.mktemp("amg") / "tiny.pt", seed=0)
    return build_model(MODEL, ckpt, "cpu")


@pytest.fixture(scope="session")
def confident(model: Any) -> Any:
    """The same random model with its heads made sure of themselves, so the default thresholds keep masks:
    mask logits scaled x5000 (the hypernetworks' last layers are linear in them: the masks keep their shapes,
    but few pixels sit within the stability offset of 0, so stability ~0.999) and the IoU head's output a
    constant sigmoid(4) ~0.98 (> 0.8). Filtering still happens: NMS (0.7) merges the overlapping masks."""
    import copy

    import torch

    confident = copy.deepcopy(model)
    decoder = confident.sam_mask_decoder
    with torch.no_grad():
        for mlp in decoder.output_hypernetworks_mlps:
            mlp.layers[-1].weight.mul_(5000)
            mlp.layers[-1].bias.mul_(5000)
        iou_out = decoder.iou_prediction_head.layers[-1]
        iou_out.weight.zero_()
        iou_out.bias.fill_(4.0)
    return confident


REGIME_MODEL = {"defaults": "confident"}


@pytest.fixture(scope="session")
def image() -> np.ndarray:
    yy, xx = np.mgrid[0:96, 0:128]
    img = np.stack([xx * 2, yy * 2, (xx + yy)], -1).astype(np.uint8)
    img[20:60, 30:90] = (220, 40, 40)
    img[(yy - 70) ** 2 + (xx - 100) ** 2 < 15**2] = (30, 200, 60)
    return img


_upstream_cache: dict[str, list[dict[str, Any]]] = {}


def upstream(model: Any, image: np.ndarray, regime: str) -> list[dict[str, Any]]:
    from sam2.automatic_mask_generator import SAM2AutomaticMaskGenerator

    if regime not in _upstream_cache:  # one model per regime (REGIME_MODEL)
        gen = SAM2AutomaticMaskGenerator(model, points_per_side=POINTS, **REGIMES[regime])
        _upstream_cache[regime] = gen.generate(image)
    return _upstream_cache[regime]


def paired_ious(ref: list[dict[str, Any]], out: list[dict[str, Any]]) -> list[float]:
    """IoU of masks paired after sorting by area (torchao's comparison)."""
    a = sorted(ref, key=lambda r: r["area"])
    b = sorted(out, key=lambda r: r["area"])
    ious = []
    for ra, rb in zip(a, b, strict=True):
        union = np.count_nonzero(ra["segmentation"] | rb["segmentation"])
        ious.append(np.count_nonzero(ra["segmentation"] & rb["segmentation"]) / union if union else 1.0)
    return ious


def check_record(rec: dict[str, Any], hw: tuple[int, int]) -> None:
    seg = rec["segmentation"]
    assert seg.dtype == np.bool_ and seg.shape == hw
    assert rec["area"] == int(seg.sum())
    ys, xs = np.nonzero(seg)
    expected = [float(xs.min()), float(ys.min()), float(xs.max() - xs.min()), float(ys.max() - ys.min())]
    assert rec["bbox"] == (expected if len(ys) else [0.0, 0.0, 0.0, 0.0])
    assert rec["crop_box"] == [0.0, 0.0, float(hw[1]), float(hw[0])]
    assert len(rec["point_coords"]) == 1 and len(rec["point_coords"][0]) == 2
    assert isinstance(rec["predicted_iou"], float) and isinstance(rec["stability_score"], float)


@pytest.mark.parametrize("regime", list(REGIMES))
def test_agrees_with_upstream(request: pytest.FixtureRequest, image: np.ndarray, regime: str) -> None:
    model = request.getfixturevalue(REGIME_MODEL.get(regime, "model"))
    ref = upstream(model, image, regime)
    out = FastMaskGenerator(model, points_per_side=POINTS, **REGIMES[regime]).generate(image)  # type: ignore[arg-type]
    assert len(out) == len(ref)
    if regime == "filters_off":
        assert len(out) == POINTS * POINTS * 3
    else:  # the filters kept some masks and dropped some: both sides of the comparison are exercised
        assert 0 < len(ref) < POINTS * POINTS * 3, len(ref)
    for rec in out:
        check_record(rec, image.shape[:2])
    if ref:
        assert float(np.mean(paired_ious(ref, out))) >= 0.99
        # Same prompts and same predicted IoUs (up to float rounding), in upstream's NMS order.
        np.testing.assert_allclose([r["predicted_iou"] for r in out], [r["predicted_iou"] for r in ref], atol=1e-5)
        assert sorted(map(str, (r["point_coords"] for r in out))) == sorted(map(str, (r["point_coords"] for r in ref)))
        np.testing.assert_allclose(
            sorted(r["stability_score"] for r in out), sorted(r["stability_score"] for r in ref), atol=1e-3
        )


@pytest.mark.parametrize("flags", [{"int8": True, "prune": True}, {"half": True}], ids=["int8+prune", "half"])
def test_approximate_flags_produce_valid_records(model: Any, image: np.ndarray, flags: dict[str, bool]) -> None:
    """Approximate modes run end to end; their agreement is measured by the benchmark, not asserted."""
    gen = FastMaskGenerator(model, points_per_side=POINTS, points_per_batch=4, **flags, **REGIMES["filters_off"])  # type: ignore[arg-type]
    out = gen.generate(image)
    assert 0 < len(out) <= POINTS * POINTS * 3
    for rec in out:
        check_record(rec, image.shape[:2])


# ---- start-up and bounded-memory output (issue #18 / #15) --------------------------------------------
def test_encoder_input_equals_the_predictors(model: Any, image: np.ndarray) -> None:
    """The generator no longer builds a SAM2ImagePredictor (torch.jit.script per instance): same features."""
    from sam2.sam2_image_predictor import SAM2ImagePredictor

    gen = FastMaskGenerator(model, points_per_side=POINTS)
    predictor = SAM2ImagePredictor(model)
    with torch.inference_mode():
        predictor.set_image(image)
        feats = predictor._features
        expected = gen.decoder.image_state(feats["image_embed"], list(feats["high_res_feats"]))
        ours = gen._encode(image)
    for name in ("keys0", "k0", "v0", "q0"):
        assert torch.equal(getattr(ours, name), getattr(expected, name)), name
    ours_lists = [*ours.pe_keys, *ours.pe_queries, *ours.high_res]
    for a, b in zip(ours_lists, [*expected.pe_keys, *expected.pe_queries, *expected.high_res], strict=True):
        assert torch.equal(a, b)


def _with_trained_like_norms(model: Any) -> Any:
    """A copy of `model` whose mask decoder LayerNorms are not the identity.

    A freshly initialised LayerNorm has weight 1 and bias 0, and a random checkpoint keeps them so; a trained one
    does not. The decoder folds the layers' norms (their mean, rstd, weight and bias) into the attentions that
    read the image tokens (PromptDecoder._last_layer_and_iou_attention, and on CPU the whole two-layer transformer
    on factors, decoder.LowRankImage), which only a non-trivial norm can test.
    """
    import copy

    other = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for module in other.sam_mask_decoder.modules():
            if isinstance(module, torch.nn.LayerNorm):
                module.weight.copy_(0.5 + torch.rand(module.weight.shape, generator=gen))
                module.bias.copy_(torch.randn(module.bias.shape, generator=gen) * 0.5)
    return other


@pytest.mark.parametrize("path", ["factored", "materialised"])
@pytest.mark.parametrize("norms", ["initial", "trained-like"])
@pytest.mark.parametrize("batch", [1, 4, 7])
def test_decoder_equals_sam2s_mask_decoder(model: Any, image: np.ndarray, batch: int, norms: str, path: str) -> None:
    """The re-associated decoder against SAM-2's own MaskDecoder, called as SAM2ImagePredictor._predict calls it:
    the same IoU predictions for every prompt, and the same low-res logits for any subset of prompts, whose mask
    tokens finish their final attention only after the IoU filter picked them. Both decoder paths: the two-layer
    transformer on factors (CPU float32's default) and the one that builds each prompt's image tokens (CUDA's)."""
    from sam2.sam2_image_predictor import SAM2ImagePredictor

    from samseg.runtime.amg.decoder import PromptDecoder

    if norms == "trained-like":
        model = _with_trained_like_norms(model)
    decoder = PromptDecoder(model, int8=False, low_rank=path == "factored").eval()
    predictor = SAM2ImagePredictor(model)
    torch.manual_seed(batch)
    coords = torch.rand(batch, 1, 2) * 1024
    labels = torch.ones(batch, 1, dtype=torch.int)
    with torch.inference_mode():
        predictor.set_image(image)
        feats = predictor._features
        sparse, dense = model.sam_prompt_encoder(points=(coords, labels), boxes=None, masks=None)
        ref_low, ref_iou, _, _ = model.sam_mask_decoder(
            image_embeddings=feats["image_embed"],
            image_pe=model.sam_prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=True,
            repeat_image=True,
            high_res_features=list(feats["high_res_feats"]),
        )
        st = decoder.image_state(feats["image_embed"], list(feats["high_res_feats"]))
        assert (st.low_rank is not None) == (path == "factored")
        queries, tokens, image_tokens, iou = decoder.run_transformer(st, coords)
        sel = torch.arange(batch)[torch.arange(batch) % 2 == 0]  # a subset, as the IoU filter would pick
        low = decoder.mask_logits(st, queries[sel], tokens[sel], tuple(part[sel] for part in image_tokens))
    torch.testing.assert_close(iou, ref_iou, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(low, ref_low[sel], atol=1e-4, rtol=1e-4)


def test_segment_packed_equals_segment(model: Any, image: np.ndarray, tmp_path: Any) -> None:
    """Masks written one at a time, bit-packed per row, equal the full-resolution masks of `segment`."""
    from samseg.core.masks import PackedMasks, unpack_masks

    seg = segmenter_on(model)
    full = seg.segment(image)
    packed = seg.segment_packed(image, tmp_path / "masks.npy")
    nonempty = sum(1 for r in upstream(model, image, "filters_off") if r["area"] > 0)
    assert packed.count == len(full.masks) == nonempty > 0
    stored = PackedMasks(packed.path, image.shape[1])
    for i, mask in enumerate(full.masks):
        assert np.array_equal(unpack_masks(stored.read(i), image.shape[1]), mask)
    np.testing.assert_array_equal(packed.predicted_iou, full.predicted_iou)
    areas = [int(m.sum()) for m in full.masks]
    assert areas == sorted(areas, reverse=True) and min(areas) > 0


# ---- per-job options (issue #16) ----------------------------------------------------------------------
def segmenter_on(model: Any, **settings: Any) -> Any:
    """A Segmenter around the fixture's model (no checkpoint file): server settings = filters off, 4x4 points."""
    import threading

    from samseg.core.options import server_options
    from samseg.core.settings import Settings
    from samseg.runtime.segmenter import Segmenter, amg_params

    seg = object.__new__(Segmenter)
    seg.settings = Settings(
        _env_file=None,
        amg_points_per_side=POINTS,
        amg_pred_iou_thresh=0.0,
        amg_stability_score_thresh=0.0,
        amg_box_nms_thresh=1.0,
        **settings,
    )
    seg.model, seg.torch, seg.device, seg.points_per_batch = model, torch, "cpu", 4
    seg._lock, seg._generators, seg._upstream = threading.RLock(), {}, {}
    seg.server_params = amg_params(server_options(seg.settings))
    return seg


def options_for(seg: Any, **changes: Any) -> Any:
    from samseg.core.options import server_options

    return server_options(seg.settings).model_copy(update=changes)


def test_per_call_params_equal_a_generator_built_with_them(model: Any, image: np.ndarray) -> None:
    """One generator (built at the server's settings) serves a job's own thresholds and grid: the masks are
    upstream's for those parameters."""
    from samseg.runtime.amg.params import AmgParams

    gen = FastMaskGenerator(model, points_per_side=POINTS, **REGIMES["filters_off"])  # type: ignore[arg-type]
    params = AmgParams(points_per_side=POINTS, **REGIMES["iou_and_nms"])  # type: ignore[arg-type]
    out = [m.record() for m in gen.generate_masks(image, params)]
    ref = upstream(model, image, "iou_and_nms")
    assert 0 < len(out) == len(ref) < POINTS * POINTS * 3
    np.testing.assert_allclose([r["predicted_iou"] for r in out], [r["predicted_iou"] for r in ref], atol=1e-5)
    smaller = gen.generate_masks(image, AmgParams(points_per_side=2, **REGIMES["filters_off"]))  # type: ignore[arg-type]
    assert len(smaller) == 2 * 2 * 3  # the job's grid, not the generator's
    assert len(gen.generate_masks(image)) == POINTS * POINTS * 3  # and back to the server's


def test_a_cancel_stops_the_generator_between_decoder_chunks(model: Any, image: np.ndarray) -> None:
    from samseg.core.errors import JobCanceled

    gen = FastMaskGenerator(model, points_per_side=POINTS, points_per_batch=4, **REGIMES["filters_off"])  # type: ignore[arg-type]
    calls = 0

    def stop_after_two_chunks() -> bool:
        nonlocal calls
        calls += 1
        return calls > 3  # the check before the encoder, then one per chunk: two chunks run

    chunks = 0
    original = gen._process_chunk

    def counting(ctx: Any, idx: Any) -> Any:
        nonlocal chunks
        chunks += 1
        return original(ctx, idx)

    gen._process_chunk = counting  # type: ignore[method-assign]
    with pytest.raises(JobCanceled):
        gen.generate_masks(image, should_stop=stop_after_two_chunks)
    assert chunks == 2 < POINTS * POINTS // 4  # stopped early: the grid needs 4 chunks of 4


def test_the_segmenter_orders_caps_and_honours_multimask_output(model: Any, image: np.ndarray) -> None:
    from sam2.automatic_mask_generator import SAM2AutomaticMaskGenerator

    seg = segmenter_on(model)
    by_area = seg.segment(image)
    by_iou = seg.segment(image, options=options_for(seg, sort_by="predicted_iou"))
    assert list(by_iou.predicted_iou) == sorted(by_iou.predicted_iou, reverse=True)
    assert len(by_iou.masks) == len(by_area.masks)
    capped = seg.segment(image, options=options_for(seg, sort_by="predicted_iou", max_masks=5))
    assert len(capped.masks) == 5
    for kept, first in zip(capped.masks, by_iou.masks[:5], strict=True):
        assert np.array_equal(kept, first)  # the first N of the uncapped order
    single = seg.segment(image, options=options_for(seg, multimask_output=False))
    ref = SAM2AutomaticMaskGenerator(model, points_per_side=POINTS, multimask_output=False, **REGIMES["filters_off"])
    expected = sorted((r for r in ref.generate(image) if r["area"] > 0), key=lambda r: -r["area"])
    assert 0 < len(single.masks) == len(expected) <= POINTS * POINTS  # one mask per prompt, not three
    assert all(np.array_equal(a, b["segmentation"]) for a, b in zip(single.masks, expected, strict=True))


# ---- torch.compile (SAMSEG_AMG_COMPILE) ---------------------------------------------------------------------
def _by_prompt(records: list[dict[str, Any]]) -> dict[tuple[float, float, int], dict[str, Any]]:
    """Records keyed by their prompt point and rank among that point's masks (by predicted IoU)."""
    keyed: dict[tuple[float, float, int], dict[str, Any]] = {}
    for rec in sorted(records, key=lambda r: (tuple(r["point_coords"][0]), -r["predicted_iou"])):
        x, y = rec["point_coords"][0]
        rank = sum(1 for k in keyed if k[:2] == (x, y))
        keyed[(x, y, rank)] = rec
    return keyed


def _assert_same_masks(ref: list[dict[str, Any]], out: list[dict[str, Any]]) -> None:
    a, b = _by_prompt(ref), _by_prompt(out)
    assert a.keys() == b.keys()
    for key, rec in a.items():
        assert b[key]["predicted_iou"] == pytest.approx(rec["predicted_iou"], abs=1e-4)
        union = np.count_nonzero(rec["segmentation"] | b[key]["segmentation"])
        inter = np.count_nonzero(rec["segmentation"] & b[key]["segmentation"])
        assert (inter / union if union else 1.0) >= 0.99  # random weights: logits sit at 0, a pixel may flip


def test_the_compiled_transformer_gives_eager_masks(model: Any, image: np.ndarray) -> None:
    """SAMSEG_AMG_COMPILE: the real inductor compile at construction (a worker's warm-up), then eager's masks,
    for the generator's grid (16 prompts, 4 full chunks) and a job's 3x3 grid (9: the last chunk padded)."""
    import shutil

    from samseg.runtime.amg.params import AmgParams

    if not (shutil.which("g++") or shutil.which("c++")):
        pytest.skip("no C++ compiler: inductor cannot compile on CPU (scripts/test.sh installs g++ when it can)")

    eager = FastMaskGenerator(model, points_per_side=POINTS, points_per_batch=4, **REGIMES["filters_off"])  # type: ignore[arg-type]
    compiled = FastMaskGenerator(
        model,
        points_per_side=POINTS,
        points_per_batch=4,
        compile=True,
        **REGIMES["filters_off"],  # type: ignore[arg-type]
    )
    assert compiled.compiled
    _assert_same_masks(eager.generate(image), compiled.generate(image))
    job = AmgParams(points_per_side=3, **REGIMES["filters_off"])  # type: ignore[arg-type]
    ref = [m.record() for m in eager.generate_masks(image, job)]
    assert len(ref) == 3 * 3 * 3
    _assert_same_masks(ref, [m.record() for m in compiled.generate_masks(image, job)])


def test_a_failed_compile_falls_back_to_eager_and_says_why(
    model: Any, image: np.ndarray, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What SAMSEG_AMG_COMPILE does on CPU in an image without a C++ compiler (the slim images): inductor's real
    compile fails, the generator logs why and runs eager, and the worker still serves. The one stand-in: inductor's
    compiler setting points at a path that does not exist (this machine has g++), with its caches off so an
    earlier compile cannot be reused."""
    import torch._dynamo
    import torch._inductor.config as inductor_config
    from structlog.testing import capture_logs

    monkeypatch.setattr(inductor_config.cpp, "cxx", (None, "/nonexistent/c++"))
    monkeypatch.setattr(inductor_config, "force_disable_caches", True)
    torch._dynamo.reset()
    with capture_logs() as logs:
        gen = FastMaskGenerator(
            model,
            points_per_side=POINTS,
            points_per_batch=4,
            compile=True,
            **REGIMES["filters_off"],  # type: ignore[arg-type]
        )
    assert not gen.compiled
    failed = [e for e in logs if e["event"] == "amg_compile_failed"]
    assert len(failed) == 1 and failed[0]["log_level"] == "error", logs
    assert "C++ compiler" in failed[0]["error"] and failed[0]["fallback"] == "eager"
    _assert_same_masks(upstream(model, image, "filters_off"), gen.generate(image))
