"""The per-call parameters of automatic mask generation (what a job's options can change), as one frozen value.

Separate from the generator so that they can be passed per call: a FastMaskGenerator is built once per process
(with `compile` its construction costs a torch.compile), while each job may ask for its own thresholds.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class AmgParams:
    """SAM2AutomaticMaskGenerator's arguments of the same names; the defaults are upstream's.

    Frozen and hashable: it is also the cache key of the upstream generators (samseg.runtime.segmenter).
    """

    points_per_side: int = 32
    pred_iou_thresh: float = 0.8
    stability_score_thresh: float = 0.95
    box_nms_thresh: float = 0.7
    min_mask_region_area: int = 0
    multimask_output: bool = True

    def __post_init__(self) -> None:
        if self.points_per_side < 1:
            raise ValueError(f"points_per_side must be at least 1, got {self.points_per_side}")
        if self.min_mask_region_area < 0:
            raise ValueError(f"min_mask_region_area must be >= 0, got {self.min_mask_region_area}")
