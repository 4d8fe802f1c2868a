"""The generator's masks after NMS, kept compact: full resolution is built one mask at a time, on demand.

A `GeneratedMask` holds what the generator already has (the low-res inside cells and boundary pixels, or a
box-cropped bit-packed mask from the dense path) plus its statistics. `dense()` gives upstream's bool
`segmentation`, `packed_rows()` the row-padded bits samseg.core.masks stores (`np.packbits(mask, axis=1)`),
each touching only the mask's box; so a caller that writes masks as they come (Segmenter.segment_packed)
never holds more than one full-resolution mask (issue #15).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from samseg.runtime.amg.decoder import Candidate
from samseg.runtime.amg.geometry import paint_rows


@dataclass(frozen=True)
class PaintContext:
    """Per image: output size and the low-res cell of every output row / column."""

    height: int
    width: int
    y_cell: np.ndarray  # int64 [H]
    x_cell: np.ndarray  # int64 [W]
    low_shape: tuple[int, int]


@dataclass(frozen=True)
class GeneratedMask:
    candidate: Candidate
    ctx: PaintContext

    @property
    def area(self) -> int:
        return self.candidate.area

    @property
    def predicted_iou(self) -> float:
        return self.candidate.iou

    @property
    def stability_score(self) -> float:
        return self.candidate.stability

    @property
    def box(self) -> list[int]:
        """XYXY, inclusive (zeros for an empty mask)."""
        return self.candidate.box

    def _paint(self, rows: np.ndarray) -> None:
        c, ctx = self.candidate, self.ctx
        if c.pos_flat is None:
            paint_rows(rows, c.box, None, c.packed, None, ctx.y_cell, ctx.x_cell, ctx.width)
            return
        r, cc = ctx.low_shape
        inside = np.unpackbits(c.packed, count=r * cc).view(bool).reshape(r, cc)
        paint_rows(rows, c.box, inside, None, c.pos_flat.numpy(), ctx.y_cell, ctx.x_cell, ctx.width)

    def dense(self) -> npt.NDArray[np.bool_]:
        """The full-resolution bool mask (upstream's `segmentation`)."""
        ctx = self.ctx
        seg = np.zeros((ctx.height, ctx.width), dtype=bool)
        y0, y1 = self.box[1], self.box[3]
        self._paint(seg[y0 : y1 + 1])
        return seg

    def packed_rows(self) -> npt.NDArray[np.uint8]:
        """`np.packbits(self.dense(), axis=1)`, building only the box's rows at full resolution."""
        ctx = self.ctx
        out = np.zeros((ctx.height, (ctx.width + 7) // 8), dtype=np.uint8)
        y0, y1 = self.box[1], self.box[3]
        rows = np.zeros((y1 - y0 + 1, ctx.width), dtype=bool)
        self._paint(rows)
        out[y0 : y1 + 1] = np.packbits(rows, axis=1)
        return out

    def record(self) -> dict[str, Any]:
        """Upstream SAM2AutomaticMaskGenerator's record, binary_mask output mode."""
        c, ctx = self.candidate, self.ctx
        x_lo, y_lo, x_hi, y_hi = (float(v) for v in c.box)
        return {
            "segmentation": self.dense(),
            "area": c.area,
            "bbox": [x_lo, y_lo, x_hi - x_lo, y_hi - y_lo],
            "predicted_iou": c.iou,
            "point_coords": [c.point],
            "stability_score": c.stability,
            "crop_box": [0.0, 0.0, float(ctx.width), float(ctx.height)],
        }
