"""A segment's mask from whichever encoding the client has: COCO RLE, polygons or the mask PNG."""

from __future__ import annotations

import itertools

import numpy as np

from samseg.core.contracts import CocoRle, MultiPolygonCoords, ResultSegment
from samseg.core.masks import BoolMask, decode_png
from samseg.core.outputs import decode_coco_rle


def mask_from_rle(rle: CocoRle | dict[str, object]) -> BoolMask:
    """bool HxW from a segment's `rle` (the same answer as `pycocotools.mask.decode`)."""
    return decode_coco_rle(rle if isinstance(rle, CocoRle) else CocoRle.model_validate(rle))


def mask_from_png(data: bytes) -> BoolMask:
    """bool HxW from a mask PNG (`mask_url`)."""
    return decode_png(data)


def mask_from_polygons(polygons: MultiPolygonCoords, height: int, width: int) -> BoolMask:
    """bool HxW: the pixels whose centres are inside the polygons (even-odd rule over all rings).

    At tolerance 0 this is exactly the segment's mask; with simplification, its approximation.
    """
    edges = [
        (float(a[0]), float(a[1]), float(b[0]), float(b[1]))
        for polygon in polygons
        for ring in polygon
        for a, b in itertools.pairwise(ring)
        if a[1] != b[1]
    ]
    out = np.zeros((height, width), dtype=np.bool_)
    if not edges:
        return out
    x1, y1, x2, y2 = (np.array(column) for column in zip(*edges, strict=True))
    low, high = np.minimum(y1, y2), np.maximum(y1, y2)
    # Rows whose centre line y = r + 0.5 crosses the edge: low <= r + 0.5 < high.
    first = np.clip(np.ceil(low - 0.5), 0, height).astype(np.int64)
    last = np.clip(np.ceil(high - 0.5), 0, height).astype(np.int64)
    spans = last - first
    edge = np.repeat(np.arange(spans.size), spans)
    rows = first[edge] + (np.arange(edge.size) - np.repeat(np.cumsum(spans) - spans, spans))
    centre = rows + 0.5
    xs = x1[edge] + (centre - y1[edge]) * (x2[edge] - x1[edge]) / (y2[edge] - y1[edge])
    order = np.lexsort((xs, rows))
    rows, xs = rows[order], xs[order]
    # Even-odd: inside between the 1st and 2nd crossing of a row, the 3rd and 4th, …
    starts, ends = xs[0::2], xs[1::2]
    row = rows[0::2]
    begin = np.clip(np.ceil(starts - 0.5), 0, width).astype(np.int64)  # first column whose centre > start
    stop = np.clip(np.ceil(ends - 0.5), 0, width).astype(np.int64)
    counts = np.zeros((height, width + 1), dtype=np.int32)
    np.add.at(counts, (row, begin), 1)
    np.add.at(counts, (row, stop), -1)
    out[:] = np.cumsum(counts, axis=1)[:, :width] > 0
    return out


def segment_mask(segment: ResultSegment, height: int, width: int) -> BoolMask | None:
    """A result.json segment's mask from its RLE, else its polygons; None when it carries neither."""
    if segment.rle is not None:
        return mask_from_rle(segment.rle)
    if segment.polygons is not None:
        return mask_from_polygons(segment.polygons, height, width)
    return None
