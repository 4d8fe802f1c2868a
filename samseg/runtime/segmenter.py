"""SAM-2 automatic mask generation, with the model loaded once per worker process.

The model is built lazily in the process that uses it (never before Celery's prefork fork: torch's
thread pools do not survive a fork and the child deadlocks), and cached for every later task.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt
import structlog

from samseg.core.errors import JobError
from samseg.core.settings import Settings
from samseg.runtime.build import ModelLoadError, build_model

log = structlog.get_logger(__name__)


class MaskGenerator(Protocol):
    def generate(self, image: npt.NDArray[np.uint8]) -> list[dict[str, Any]]: ...


@dataclass
class Segmentation:
    """Masks sorted by area (largest first), empty masks dropped; arrays share one index."""

    masks: list[npt.NDArray[np.bool_]]  # N arrays of (H, W): the generator's own, never stacked into a copy
    predicted_iou: npt.NDArray[np.float32]
    stability_score: npt.NDArray[np.float32]
    seconds: float


class Segmenter:
    def __init__(self, settings: Settings) -> None:
        import torch

        self.settings = settings
        self.device = settings.resolved_device()
        started = time.perf_counter()
        self.model = build_model(settings.sam2_model, settings.checkpoint_path, self.device)
        self.torch = torch
        # One lock for building generators and running them: SAM-2's predictor scripts its transforms with
        # torch.jit when built, which is not thread-safe, and one model serves one inference at a time.
        self._lock = threading.RLock()
        self._generators: dict[int, MaskGenerator] = {}
        log.info(
            "model_loaded",
            model=settings.sam2_model,
            checkpoint=str(settings.checkpoint_path),
            device=self.device,
            amg_impl=settings.amg_impl,
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
            self.generator(self.settings.amg_points_per_batch).generate(image)
        return time.perf_counter() - started

    def _make_generator(self, points_per_batch: int) -> MaskGenerator:
        s = self.settings
        params: dict[str, Any] = {
            "points_per_side": s.amg_points_per_side,
            "points_per_batch": points_per_batch,
            "pred_iou_thresh": s.amg_pred_iou_thresh,
            "stability_score_thresh": s.amg_stability_score_thresh,
            "box_nms_thresh": s.amg_box_nms_thresh,
            "min_mask_region_area": s.amg_min_mask_region_area,
        }
        if s.amg_impl == "fast":
            from samseg.runtime.amg import FastMaskGenerator

            return FastMaskGenerator(
                self.model, **params, int8=s.amg_int8, compile=s.amg_compile, half=s.amg_half, prune=s.amg_prune
            )
        from sam2.automatic_mask_generator import SAM2AutomaticMaskGenerator

        return SAM2AutomaticMaskGenerator(self.model, output_mode="binary_mask", **params)  # type: ignore[no-any-return]

    def segment(self, image: npt.NDArray[np.uint8], points_per_batch: int | None = None) -> Segmentation:
        with self._lock, self.torch.inference_mode():
            # Timed inside the lock: with a threaded GPU worker another task may hold the model first, and
            # `seconds` is the model's time, not the wait for it.
            started = time.perf_counter()
            generator = self.generator(points_per_batch or self.settings.amg_points_per_batch)
            records = generator.generate(image)
            seconds = time.perf_counter() - started
        return to_segmentation(records, image.shape[:2], seconds)

    def segment_with_fallback(self, image: npt.NDArray[np.uint8]) -> Segmentation:
        """On out-of-memory, free what the failed attempt held and retry once with a quarter of the batch."""
        batch = self.settings.amg_points_per_batch
        try:
            return self.segment(image, batch)
        except Exception as exc:
            if not is_out_of_memory(exc):
                raise
            smaller = max(1, batch // 4)
            log.warning("segment_out_of_memory", points_per_batch=batch, retry_with=smaller, error=str(exc)[:300])
            self._release_memory()
        try:
            return self.segment(image, smaller)
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


def to_segmentation(records: list[dict[str, Any]], shape: tuple[int, ...], seconds: float) -> Segmentation:
    areas = [int(np.count_nonzero(r["segmentation"])) for r in records]
    order = sorted((i for i, area in enumerate(areas) if area > 0), key=lambda i: areas[i], reverse=True)
    kept = [records[i] for i in order]
    return Segmentation(
        masks=[np.asarray(r["segmentation"], dtype=bool) for r in kept],
        predicted_iou=np.array([float(r["predicted_iou"]) for r in kept], dtype=np.float32),
        stability_score=np.array([float(r["stability_score"]) for r in kept], dtype=np.float32),
        seconds=seconds,
    )


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
