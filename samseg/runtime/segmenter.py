"""SAM-2 automatic mask generation, with the model loaded once per worker process.

The model is built lazily in the process that uses it (never before Celery's prefork fork: torch's
thread pools do not survive a fork and the child deadlocks), and cached for every later task.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

import numpy as np
import numpy.typing as npt
import structlog

from samseg.core.contracts import EffectiveOptions
from samseg.core.errors import JobCanceled, JobError
from samseg.core.options import server_options
from samseg.core.settings import Settings
from samseg.runtime.amg.params import AmgParams
from samseg.runtime.build import ModelLoadError, build_model

log = structlog.get_logger(__name__)
T = TypeVar("T")
# Upstream generators (SAMSEG_AMG_IMPL=upstream, or a job with multimask_output=false) kept per parameter set:
# each costs a torch.jit.script of SAM2ImagePredictor's transforms (~1.3 s on CPU) to build.
UPSTREAM_CACHE = 4


def amg_params(options: EffectiveOptions) -> AmgParams:
    """The generator's share of a job's effective options."""
    return AmgParams(
        points_per_side=options.points_per_side,
        pred_iou_thresh=options.pred_iou_thresh,
        stability_score_thresh=options.stability_score_thresh,
        box_nms_thresh=options.box_nms_thresh,
        min_mask_region_area=options.min_mask_region_area,
        multimask_output=options.multimask_output,
    )


def _never() -> bool:
    return False


class MaskGenerator(Protocol):
    def generate(self, image: npt.NDArray[np.uint8]) -> list[dict[str, Any]]: ...


@dataclass
class Segmentation:
    """Masks sorted by area (largest first), empty masks dropped; arrays share one index."""

    masks: list[npt.NDArray[np.bool_]]  # N arrays of (H, W): the generator's own, never stacked into a copy
    predicted_iou: npt.NDArray[np.float32]
    stability_score: npt.NDArray[np.float32]
    seconds: float


@dataclass
class PackedSegmentation:
    """`Segmentation` whose masks are already in a packed-masks file (samseg.core.masks.PackedMasks)."""

    path: Path
    count: int
    height: int
    width: int
    predicted_iou: npt.NDArray[np.float32]
    stability_score: npt.NDArray[np.float32]
    seconds: float


class Segmenter:
    def __init__(self, settings: Settings) -> None:
        import torch

        self.settings = settings
        self.device = settings.resolved_device()
        started = time.perf_counter()
        self.model = build_model(
            settings.sam2_model, settings.checkpoint_path, self.device, malloc_tuning=settings.malloc_tuning
        )
        self.points_per_batch = settings.resolved_points_per_batch(self.device)
        self.torch = torch
        # One lock for building generators and running them: upstream's predictor scripts its transforms with
        # torch.jit when built, which is not thread-safe, and one model serves one inference at a time.
        self._lock = threading.RLock()
        self._generators: dict[int, MaskGenerator] = {}
        self._upstream: dict[tuple[AmgParams, int], MaskGenerator] = {}
        self.server_params = amg_params(server_options(settings))
        log.info(
            "model_loaded",
            model=settings.sam2_model,
            checkpoint=str(settings.checkpoint_path),
            device=self.device,
            amg_impl=settings.amg_impl,
            points_per_batch=self.points_per_batch,
            seconds=round(time.perf_counter() - started, 2),
        )

    def generator(self, points_per_batch: int) -> MaskGenerator:
        with self._lock:
            if points_per_batch not in self._generators:
                self._generators[points_per_batch] = self._make_generator(points_per_batch)
            return self._generators[points_per_batch]

    def warm_up(self) -> float:
        """One inference through the generator jobs will use, so the first job pays no lazy set-up.

        It must be that same cached generator: with SAMSEG_AMG_COMPILE a new instance compiles again.
        """
        started = time.perf_counter()
        image = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
        with self._lock, self.torch.inference_mode():
            self.generator(self.points_per_batch).generate(image)
        return time.perf_counter() - started

    def _make_generator(self, points_per_batch: int) -> MaskGenerator:
        """The process's generator at the server's settings. The fast one takes a job's options per call
        (`generate_masks(params=…)`), so one instance — compiled once with SAMSEG_AMG_COMPILE — serves every job."""
        s = self.settings
        if s.amg_impl != "fast":
            return self.upstream_generator(self.server_params, points_per_batch)
        from samseg.runtime.amg import FastMaskGenerator

        p = self.server_params
        return FastMaskGenerator(
            self.model,
            points_per_side=p.points_per_side,
            points_per_batch=points_per_batch,
            pred_iou_thresh=p.pred_iou_thresh,
            stability_score_thresh=p.stability_score_thresh,
            box_nms_thresh=p.box_nms_thresh,
            min_mask_region_area=p.min_mask_region_area,
            int8=s.amg_int8,
            compile=s.amg_compile,
            half=s.amg_half,
            prune=s.amg_prune,
        )

    def upstream_generator(self, params: AmgParams, points_per_batch: int) -> MaskGenerator:
        """sam2's own generator for `params` (cached, at most UPSTREAM_CACHE parameter sets, oldest dropped):
        SAMSEG_AMG_IMPL=upstream, and jobs with multimask_output=false, which the fast generator does not
        implement (SAM-2's single-mask output with its dynamic stability fallback)."""
        from sam2.automatic_mask_generator import SAM2AutomaticMaskGenerator

        with self._lock:
            key = (params, points_per_batch)
            if key not in self._upstream:
                while len(self._upstream) >= UPSTREAM_CACHE:
                    self._upstream.pop(next(iter(self._upstream)))
                self._upstream[key] = SAM2AutomaticMaskGenerator(
                    self.model,
                    points_per_side=params.points_per_side,
                    points_per_batch=points_per_batch,
                    pred_iou_thresh=params.pred_iou_thresh,
                    stability_score_thresh=params.stability_score_thresh,
                    box_nms_thresh=params.box_nms_thresh,
                    min_mask_region_area=params.min_mask_region_area,
                    multimask_output=params.multimask_output,
                    output_mode="binary_mask",
                )
            return self._upstream[key]

    def segment(
        self,
        image: npt.NDArray[np.uint8],
        points_per_batch: int | None = None,
        options: EffectiveOptions | None = None,
        should_stop: Callable[[], bool] | None = None,
    ) -> Segmentation:
        seconds, masks = self._generate(image, points_per_batch, options, should_stop)
        return Segmentation(
            masks=[m.dense() for m in masks],
            predicted_iou=np.array([m.predicted_iou for m in masks], dtype=np.float32),
            stability_score=np.array([m.stability_score for m in masks], dtype=np.float32),
            seconds=seconds,
        )

    def segment_packed(
        self,
        image: npt.NDArray[np.uint8],
        path: Path,
        points_per_batch: int | None = None,
        options: EffectiveOptions | None = None,
        should_stop: Callable[[], bool] | None = None,
    ) -> PackedSegmentation:
        """Like `segment`, but the masks go straight into a `write_packed_masks` file, one at a time.

        Peak memory is the generator's compact masks plus one full-resolution mask, instead of every mask at
        full resolution (40 MP x 100 masks: ~4 GB as bool). The file is what samseg.core.masks.PackedMasks reads.
        """
        seconds, masks = self._generate(image, points_per_batch, options, should_stop)
        height, width = image.shape[:2]
        write_packed_rows(path, (m.packed_rows() for m in masks), len(masks), height, width)
        return PackedSegmentation(
            path=path,
            count=len(masks),
            height=height,
            width=width,
            predicted_iou=np.array([m.predicted_iou for m in masks], dtype=np.float32),
            stability_score=np.array([m.stability_score for m in masks], dtype=np.float32),
            seconds=seconds,
        )

    def _generate(
        self,
        image: npt.NDArray[np.uint8],
        points_per_batch: int | None,
        options: EffectiveOptions | None = None,
        should_stop: Callable[[], bool] | None = None,
    ) -> tuple[float, list[OutputMask]]:
        """The generator's masks in the job's order (`sort_by`), empty ones dropped, the first `max_masks` kept;
        and the model's seconds. `options` None: the server's settings. `should_stop` is asked before the model,
        between decoder chunks (fast generator) and after it; True raises JobCanceled."""
        effective = options or server_options(self.settings)
        params = amg_params(effective)
        stop = should_stop or _never
        batch = points_per_batch or self.points_per_batch
        with self._lock, self.torch.inference_mode():
            if stop():
                raise JobCanceled()
            # Timed inside the lock: with a threaded GPU worker another task may hold the model first, and
            # `seconds` is the model's time, not the wait for it.
            started = time.perf_counter()
            fast = self.settings.amg_impl == "fast" and params.multimask_output
            generator = self.generator(batch) if fast else self.upstream_generator(params, batch)
            if fast:
                masks: list[OutputMask] = list(generator.generate_masks(image, params, stop))  # type: ignore[attr-defined]
            else:
                masks = [_RecordMask(r) for r in generator.generate(image)]
            seconds = time.perf_counter() - started
        if stop():
            raise JobCanceled()
        return seconds, order_masks(masks, effective.sort_by, effective.max_masks)

    def segment_with_fallback(
        self,
        image: npt.NDArray[np.uint8],
        options: EffectiveOptions | None = None,
        should_stop: Callable[[], bool] | None = None,
    ) -> Segmentation:
        """On out-of-memory, free what the failed attempt held and retry once with a quarter of the batch."""
        return self._with_fallback(lambda batch: self.segment(image, batch, options, should_stop))

    def segment_packed_with_fallback(
        self,
        image: npt.NDArray[np.uint8],
        path: Path,
        options: EffectiveOptions | None = None,
        should_stop: Callable[[], bool] | None = None,
    ) -> PackedSegmentation:
        """`segment_packed` with `segment_with_fallback`'s out-of-memory retry (a cancel is never retried)."""
        return self._with_fallback(lambda batch: self.segment_packed(image, path, batch, options, should_stop))

    def _with_fallback(self, run: Callable[[int], T]) -> T:
        batch = self.points_per_batch
        try:
            return run(batch)
        except Exception as exc:
            if not is_out_of_memory(exc):
                raise
            smaller = max(1, batch // 4)
            log.warning("segment_out_of_memory", points_per_batch=batch, retry_with=smaller, error=str(exc)[:300])
            self._release_memory()
        try:
            return run(smaller)
        except Exception as exc:
            if not is_out_of_memory(exc):
                raise
            self._release_memory()
            raise JobError(
                "model_out_of_memory",
                f"out of memory at points_per_batch={batch} and again at {smaller}: {str(exc)[:300]}",
            ) from exc

    def _release_memory(self) -> None:
        import gc

        gc.collect()
        if self.device.startswith("cuda"):
            self.torch.cuda.empty_cache()


def is_out_of_memory(exc: BaseException) -> bool:
    import torch

    return isinstance(exc, torch.OutOfMemoryError | MemoryError) or "out of memory" in str(exc).lower()


class OutputMask(Protocol):
    """One generated mask: statistics now, full resolution on demand (samseg.runtime.amg.GeneratedMask)."""

    @property
    def area(self) -> int: ...
    @property
    def predicted_iou(self) -> float: ...
    @property
    def stability_score(self) -> float: ...
    def dense(self) -> npt.NDArray[np.bool_]: ...
    def packed_rows(self) -> npt.NDArray[np.uint8]: ...


class _RecordMask:
    """An upstream record (SAMSEG_AMG_IMPL=upstream) seen as an OutputMask; its mask is already full size."""

    def __init__(self, record: dict[str, Any]) -> None:
        self.mask = np.asarray(record["segmentation"], dtype=bool)
        self.area = int(np.count_nonzero(self.mask))
        self.predicted_iou = float(record["predicted_iou"])
        self.stability_score = float(record["stability_score"])

    def dense(self) -> npt.NDArray[np.bool_]:
        return self.mask

    def packed_rows(self) -> npt.NDArray[np.uint8]:
        return np.packbits(self.mask, axis=1)


def write_packed_rows(path: Path, rows: Iterable[npt.NDArray[np.uint8]], count: int, height: int, width: int) -> None:
    """samseg.core.masks.write_packed_masks' file, from masks already packed per row (one in memory at a time)."""
    row_bytes = (width + 7) // 8
    with path.open("wb") as out:
        header = {"descr": "|u1", "fortran_order": False, "shape": (count, height, row_bytes)}
        np.lib.format.write_array_header_1_0(out, header)
        written = 0
        for packed in rows:
            if packed.shape != (height, row_bytes) or packed.dtype != np.uint8:
                raise ValueError(f"mask {written} is {packed.shape} {packed.dtype}, expected {(height, row_bytes)}")
            out.write(packed.tobytes())
            written += 1
    if written != count:
        raise ValueError(f"wrote {written} masks, announced {count}")


def sort_masks(masks: list[OutputMask]) -> list[OutputMask]:
    """Largest first, empty masks dropped (stable: equal areas keep the generator's order)."""
    return order_masks(masks, "area", None)


def order_masks(masks: list[OutputMask], sort_by: str, max_masks: int | None) -> list[OutputMask]:
    """Empty masks dropped, then `area` (largest first) or `predicted_iou` (highest first) order, stable on
    ties (the generator's order), then the first `max_masks` (None: all). The index is the segment_id."""

    def key(i: int) -> float:
        return float(masks[i].area) if sort_by == "area" else float(masks[i].predicted_iou)

    order = sorted((i for i, m in enumerate(masks) if m.area > 0), key=key, reverse=True)
    return [masks[i] for i in order[:max_masks]]


_instance: Segmenter | None = None
_instance_pid: int | None = None
_instance_lock = threading.Lock()


def get_segmenter(settings: Settings) -> Segmenter:
    """The process's model; built on first use and again only after a fork."""
    global _instance, _instance_pid
    with _instance_lock:
        if _instance is None or _instance_pid != os.getpid():
            try:
                _instance = Segmenter(settings)
            except JobError:
                raise
            except (ModelLoadError, RuntimeError, OSError, ValueError, ImportError) as exc:
                # Narrow on purpose: Celery's SoftTimeLimitExceeded must pass through as a timeout.
                raise JobError("model_unavailable", f"the SAM-2 model could not be loaded: {exc}") from exc
            _instance_pid = os.getpid()
        return _instance
