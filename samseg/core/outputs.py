"""Optional encodings of a job's masks (issue #16): COCO RLE, polygons, a label map and an overlay preview.

Pure: numpy and Pillow only (no torch, no pycocotools at run time). Every function works on one mask at a
time; the label map and the overlay stream the bit-packed masks (`PackedMasks`), so at most one unpacked mask
(cropped to its bounding box) is in memory next to the label map. docs/outputs.md is the client-facing spec.
"""

from __future__ import annotations

import colorsys
import io
import math
import struct
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt
from PIL import Image

from samseg.core.contracts import CocoRle, ErrorInfo, MultiPolygonCoords
from samseg.core.masks import PNG_COMPRESS_LEVEL, PNG_SIGNATURE, BoolMask

# Where the job-level outputs live next to mask_images/ (and the API path below /assets/{uuid}/).
LABEL_MAP_FILE = "label_map.png"
OVERLAY_FILE = "overlay.jpg"

# The default bound on one mask's polygon vertices (Settings.polygon_max_vertices overrides it); see polygons().
DEFAULT_MAX_VERTICES = 100_000
# With a tolerance > 0, a mask whose exact outline has more than this many times max_vertices is refused
# without simplifying (simplification is per-ring Python work; this bounds it).
SIMPLIFY_WORK_FACTOR = 8
OVERLAY_MAX_SIDE = 2048
OVERLAY_ALPHA = 0.5
OVERLAY_JPEG_QUALITY = 85
MAX_LABELS = 65_535  # uint16: label = segment_id + 1


class PackedMaskSource(Protocol):
    """What the streaming encoders need: `samseg.core.masks.PackedMasks` is one."""

    width: int
    height: int

    def __len__(self) -> int: ...

    def read(self, index: int) -> npt.NDArray[np.uint8]: ...


def unpack(packed: npt.NDArray[np.uint8], width: int) -> BoolMask:
    """One bit-packed mask (`np.packbits(mask, axis=1)`) back to bool HxW."""
    return np.unpackbits(packed, axis=1, count=width).view(np.bool_)


def _crop(mask: BoolMask) -> tuple[int, int, BoolMask] | None:
    """(x0, y0, the mask inside its tight bounding box); None for an empty mask."""
    rows = np.flatnonzero(mask.any(axis=1))
    if rows.size == 0:
        return None
    cols = np.flatnonzero(mask.any(axis=0))
    y0, y1, x0, x1 = int(rows[0]), int(rows[-1]), int(cols[0]), int(cols[-1])
    return x0, y0, mask[y0 : y1 + 1, x0 : x1 + 1]


def _crop_packed(packed: npt.NDArray[np.uint8], width: int) -> tuple[int, int, BoolMask] | None:
    """`_crop` of a bit-packed mask, unpacking only the rows of its bounding box."""
    rows = np.flatnonzero(packed.any(axis=1))
    if rows.size == 0:
        return None
    y0, y1 = int(rows[0]), int(rows[-1])
    band = np.unpackbits(packed[y0 : y1 + 1], axis=1, count=width).view(np.bool_)
    cols = np.flatnonzero(band.any(axis=0))
    x0, x1 = int(cols[0]), int(cols[-1])
    return x0, y0, band[:, x0 : x1 + 1]


def _check_mask(mask: Any, name: str = "mask") -> BoolMask:
    array = np.asarray(mask)
    if array.ndim != 2:
        raise ValueError(f"{name} must be a 2-D array (height, width), got shape {array.shape}")
    if array.dtype != np.bool_:
        raise ValueError(f"{name} must be a bool array, got dtype {array.dtype}")
    return array


# --- COCO RLE --------------------------------------------------------------------------------------------


def rle_counts(mask: BoolMask) -> npt.NDArray[np.int64]:
    """Run lengths of the mask in column-major order, starting with a (possibly empty) run of zeros.

    Work is proportional to the mask's bounding box, not to the image.
    """
    mask = _check_mask(mask)
    height, width = mask.shape
    total = height * width
    if total == 0:
        return np.zeros(1, dtype=np.int64)  # pycocotools: one empty run
    cropped = _crop(mask)
    if cropped is None:
        return np.array([total], dtype=np.int64)
    return _counts_from_crop(cropped, height, width)


def _counts_from_crop(cropped: tuple[int, int, BoolMask], height: int, width: int) -> npt.NDArray[np.int64]:
    x0, y0, sub = cropped
    hh, ww = sub.shape
    # A zero row above and below each column of the crop: every change of value inside the padded,
    # column-major sequence is a change in the full mask, at a position computed back below.
    padded = np.zeros((ww, hh + 2), dtype=np.bool_)
    padded[:, 1:-1] = sub.T
    flat = padded.reshape(-1)
    change = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    column, row = np.divmod(change, hh + 2)
    position = (x0 + column) * height + (y0 + row - 1)
    total = height * width
    # A crop as tall as the mask: ones at the bottom of a column and the top of the next are one run, seen
    # as a change to the padding and back at the same position; both go.
    same = position[1:] == position[:-1]
    twice = np.zeros(position.size, dtype=np.bool_)
    twice[1:] |= same
    twice[:-1] |= same
    position = position[~twice & (position < total)]  # ones up to the last pixel: no closing change
    bounds = np.concatenate(([0], position, [total]))
    return np.diff(bounds).astype(np.int64)


def encode_rle_counts(counts: npt.NDArray[np.int64]) -> str:
    """pycocotools' `rleToString`: each count (from the 4th on, minus the count two before it) as a
    little-endian sequence of signed 5-bit groups, 0x20 = more groups follow, each group + 48 as ASCII.
    """
    if counts.size == 0:
        return ""
    values = counts.astype(np.int64).copy()
    if values.size > 3:
        values[3:] -= counts[1:-2]
    groups: list[npt.NDArray[np.int64]] = []
    emitted: list[npt.NDArray[np.bool_]] = []
    active = np.ones(values.shape, dtype=np.bool_)
    while active.any():
        group = values & 0x1F
        values = values >> 5  # arithmetic shift: negative deltas end on -1
        more = np.where(group & 0x10, values != -1, values != 0)
        groups.append(np.where(more, group | 0x20, group) + 48)
        emitted.append(active)
        active = active & more
    chars = np.stack(groups, axis=1)[np.stack(emitted, axis=1)]
    return chars.astype(np.uint8).tobytes().decode("ascii")


def decode_rle_counts(counts: str) -> npt.NDArray[np.int64]:
    """The inverse of `encode_rle_counts` (pycocotools' `rleFrString`)."""
    chars = np.frombuffer(counts.encode("ascii"), dtype=np.uint8).astype(np.int64) - 48
    if chars.size == 0:
        return np.zeros(0, dtype=np.int64)
    if chars.min() < 0 or chars.max() > 63:
        raise ValueError("counts has characters outside the COCO RLE alphabet ('0' to 'o')")
    last = (chars & 0x20) == 0
    if not last[-1]:
        raise ValueError("counts ends in the middle of a number")
    ends = np.flatnonzero(last)
    starts = np.concatenate(([0], ends[:-1] + 1))
    index = np.arange(chars.size)
    group_of = np.repeat(np.arange(ends.size), ends - starts + 1)
    shift = 5 * (index - starts[group_of])
    if shift.max(initial=0) > 55:
        raise ValueError("counts has a number too large for 64 bits")
    values = np.add.reduceat((chars & 0x1F) << shift, starts)
    lengths = ends - starts + 1
    negative = (chars[ends] & 0x10) != 0
    values = np.where(negative, values - (np.int64(1) << (5 * lengths)), values)
    out = values.copy()
    # count[i] = value[i] + count[i - 2] for i > 2: a running sum over odd positions from 1, even from 2.
    out[1::2] = np.cumsum(values[1::2])
    if out.size > 2:
        out[2::2] = np.cumsum(values[2::2])
    return out


def coco_rle(mask: BoolMask) -> dict[str, Any]:
    """COCO compressed RLE: `{"size": [h, w], "counts": str}`, byte-identical to `pycocotools.mask.encode`
    (whose `counts` is the same text as bytes)."""
    mask = _check_mask(mask)
    return {"size": [int(mask.shape[0]), int(mask.shape[1])], "counts": encode_rle_counts(rle_counts(mask))}


def coco_rle_packed(packed: npt.NDArray[np.uint8], width: int) -> dict[str, Any]:
    """`coco_rle` of a bit-packed mask, unpacking only its bounding box's rows."""
    height = int(packed.shape[0])
    total = height * width
    cropped = _crop_packed(packed, width)
    if total == 0:
        counts = np.zeros(1, dtype=np.int64)
    elif cropped is None:
        counts = np.array([total], dtype=np.int64)
    else:
        counts = _counts_from_crop(cropped, height, width)
    return {"size": [height, width], "counts": encode_rle_counts(counts)}


def decode_coco_rle(rle: dict[str, Any] | CocoRle) -> BoolMask:
    """A COCO compressed RLE (`{"size": [h, w], "counts": str | bytes}`) back to a bool HxW mask."""
    if isinstance(rle, CocoRle):
        size, counts = rle.size, rle.counts
    else:
        size, counts = rle["size"], rle["counts"]
    if isinstance(counts, bytes):
        counts = counts.decode("ascii")
    height, width = int(size[0]), int(size[1])
    runs = decode_rle_counts(counts)
    if runs.size and runs.min() < 0:
        raise ValueError("counts decodes to a negative run length")
    if int(runs.sum()) != height * width:
        raise ValueError(f"counts covers {int(runs.sum())} pixels, size says {height}x{width}={height * width}")
    values = np.arange(runs.size) % 2 == 1
    flat = np.repeat(values, runs)
    return np.ascontiguousarray(flat.reshape(width, height).T)


# --- polygons --------------------------------------------------------------------------------------------

# Edge directions in pixel space (x right, y down): 0 east, 1 south, 2 west, 3 north.
_DX = np.array([1, 0, -1, 0], dtype=np.int64)
_DY = np.array([0, 1, 0, -1], dtype=np.int64)


class PolygonTooComplex(ValueError):
    """A mask's polygons would have more vertices than allowed: the segment gets `polygons_error` instead."""

    code = "polygon_too_complex"

    def __init__(self, vertices: int, limit: int, tolerance: float) -> None:
        super().__init__(
            f"the mask's outline has {vertices} vertices at tolerance {tolerance:g}, more than the limit of {limit}"
        )
        self.vertices = vertices
        self.limit = limit
        self.tolerance = tolerance


def outline_vertex_count(mask: BoolMask) -> int:
    """The number of vertices `polygons(mask, 0)` returns (closing vertices not counted), without tracing.

    Every pixel corner where the outline turns is one vertex; a corner where two pixels touch only
    diagonally is two (two rings touch there).
    """
    cropped = _crop(_check_mask(mask))
    return 0 if cropped is None else _corner_count(_pad(cropped[2]))


def _pad(sub: BoolMask) -> BoolMask:
    padded = np.zeros((sub.shape[0] + 2, sub.shape[1] + 2), dtype=np.bool_)
    padded[1:-1, 1:-1] = sub
    return padded


def _corner_count(padded: BoolMask) -> int:
    top = padded[:-1, :-1] ^ padded[:-1, 1:]
    side = padded[:-1, :-1] ^ padded[1:, :-1]
    odd = top ^ padded[1:, :-1] ^ padded[1:, 1:]  # 1 or 3 of the 4 pixels at a corner: the outline turns
    diagonal = ~odd & top & side  # two pixels touching only at the corner: two rings turn there
    return int(np.count_nonzero(odd) + 2 * np.count_nonzero(diagonal))


def polygons(mask: BoolMask, tolerance: float = 0.0, *, max_vertices: int = DEFAULT_MAX_VERTICES) -> MultiPolygonCoords:
    """The mask as GeoJSON MultiPolygon coordinates in pixel space; see docs/outputs.md for the full spec.

    Vertices are pixel corners (integers; pixel (row r, col c) is the square [c, c+1] x [r, r+1]). The
    foreground is 4-connected: pixels that touch only at a corner belong to different polygons (or a polygon
    and its hole), and rings touch at that corner without crossing. Each ring is simple and closed; outer
    rings have positive shoelace area (counter-clockwise per RFC 7946 when y is read upwards), holes negative.
    At tolerance 0 the region inside the outer rings and outside the holes is exactly the union of the
    mask's pixel squares (so it contains exactly the centres of the mask's pixels), and the result is a
    valid OGC MultiPolygon. With tolerance > 0 each ring is simplified on its own (Douglas-Peucker, keeping
    the vertices farther than `tolerance` px from the simplified line); rings left with no area are dropped
    (with their holes), and rings may then cross.

    Raises PolygonTooComplex when the result would have more than `max_vertices` vertices (the closing
    vertex of each ring not counted), or at tolerance > 0 when the exact outline has more than
    SIMPLIFY_WORK_FACTOR * max_vertices.
    """
    return _polygons_of_crop(_crop(_check_mask(mask)), tolerance, max_vertices)


def polygons_packed(
    packed: npt.NDArray[np.uint8], width: int, tolerance: float = 0.0, *, max_vertices: int = DEFAULT_MAX_VERTICES
) -> MultiPolygonCoords:
    """`polygons` of a bit-packed mask."""
    return _polygons_of_crop(_crop_packed(packed, width), tolerance, max_vertices)


def _polygons_of_crop(
    cropped: tuple[int, int, BoolMask] | None, tolerance: float, max_vertices: int
) -> MultiPolygonCoords:
    if not (tolerance >= 0 and math.isfinite(tolerance)):
        raise ValueError(f"tolerance must be a finite number >= 0, got {tolerance}")
    if cropped is None:
        return []
    x0, y0, sub = cropped
    padded = _pad(sub)
    corners = _corner_count(padded)
    budget = max_vertices if tolerance == 0 else SIMPLIFY_WORK_FACTOR * max_vertices
    if corners > budget:
        raise PolygonTooComplex(corners, max_vertices, tolerance)
    xy, offsets = _trace(padded)
    shells, holes_of = _nest(xy, offsets, padded)
    points: list[list[int]] = (xy + np.array([x0, y0])).tolist()
    simplified = _simplify(xy, offsets, tolerance) if tolerance > 0 else None

    def ring(index: int) -> list[list[int]] | None:
        a, b = int(offsets[index]), int(offsets[index + 1])
        if simplified is None:
            vertices = points[a:b]
        else:
            kept = simplified[index]
            if kept is None:
                return None
            vertices = [points[a + i] for i in kept.tolist()]
        vertices.append(vertices[0])
        return vertices

    result: MultiPolygonCoords = []
    total = 0
    for shell_index in shells:
        shell = ring(shell_index)
        if shell is None:
            continue
        polygon = [shell]
        for hole_index in holes_of.get(shell_index, []):
            hole = ring(hole_index)
            if hole is not None:
                polygon.append(hole)
        total += sum(len(r) - 1 for r in polygon)
        result.append(polygon)
    if total > max_vertices:
        raise PolygonTooComplex(total, max_vertices, tolerance)
    return result


def _trace(padded: BoolMask) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    """Every boundary ring of the mask inside `padded`: corner vertices (x, y) in the unpadded mask's
    coordinates, ring after ring (`offsets[i]:offsets[i + 1]`, not closed), split so that no ring visits a
    vertex twice, each starting at its top-most then left-most vertex."""
    # Directed unit edges with the foreground on the traveller's right in pixel space (y down), i.e. a lone
    # pixel is walked east, south, west, north: positive shoelace area. Padded pixel (r, c) is the mask's
    # (r - 1, c - 1), the square [c - 1, c] x [r - 1, r].
    width = padded.shape[1]
    flat = padded.reshape(-1)
    across = np.flatnonzero(flat[1:] != flat[:-1])  # padded (r, c) | (r, c + 1): a vertical edge at x = c
    row, col = np.divmod(across, width)
    fg_left = flat[across]
    down = np.flatnonzero(flat[width:] != flat[:-width])  # padded (r, c) over (r + 1, c): horizontal at y = r
    hrow, hcol = np.divmod(down, width)
    fg_below = flat[down + width]
    sx = np.concatenate((col, col, hcol - 1, hcol)).astype(np.int64)
    sy = np.concatenate((row - 1, row, hrow, hrow)).astype(np.int64)
    sd = np.concatenate(
        (
            np.ones(across.size, np.int64),
            np.full(across.size, 3, np.int64),
            np.zeros(down.size, np.int64),
            np.full(down.size, 2, np.int64),
        )
    )
    # right side of a foreground pixel: from (x, y) south; left side: from (x, y + 1) north; top: from (x, y)
    # east; bottom: from (x + 1, y) west.
    real = np.concatenate((fg_left, ~fg_left, fg_below, ~fg_below))
    sx, sy, sd = sx[real], sy[real], sd[real]
    stride = width + 1
    keys = (sy * stride + sx) * 4 + sd
    # Number the edges in (y, x) order of their start: a cycle's smallest edge starts at its top-left vertex.
    order = np.argsort(keys)
    keys, sx, sy, sd = keys[order], sx[order], sy[order], sd[order]
    end = ((sy + _DY[sd]) * stride + (sx + _DX[sd])) * 4
    nxt = np.full(keys.size, -1, dtype=np.int64)
    # At the end vertex: turn towards the foreground if that edge exists (only at a diagonal "saddle" corner
    # are there two ways on: turning keeps the two diagonal pixels apart, 4-connectivity), else go on.
    for turn in (1, 0, 3):
        pending = np.flatnonzero(nxt < 0)
        wanted = end[pending] + (sd[pending] + turn) % 4
        at = np.minimum(np.searchsorted(keys, wanted), keys.size - 1)
        hit = keys[at] == wanted
        nxt[pending[hit]] = at[hit]
    if (nxt < 0).any():  # pragma: no cover - impossible for a boundary of pixel squares
        raise AssertionError("open boundary")
    cycle, rank = _cycles(nxt)
    previous = np.empty_like(nxt)
    previous[nxt] = np.arange(nxt.size)
    corner = sd != sd[previous]  # vertices: where the direction changes (collinear unit edges merge)
    sequence = np.lexsort((rank, cycle))
    sequence = sequence[corner[sequence]]
    xy = np.stack((sx[sequence], sy[sequence]), axis=1)
    ring_of = cycle[sequence]
    offsets = np.concatenate(([0], np.flatnonzero(np.diff(ring_of)) + 1, [ring_of.size]))
    # A ring that passes a corner twice (two pixels of one component touching diagonally there) is split.
    ring_index = np.repeat(np.arange(offsets.size - 1), np.diff(offsets))
    vertex_keys = ring_index * (stride * (padded.shape[0] + 1)) + xy[:, 1] * stride + xy[:, 0]
    ordered = np.sort(vertex_keys)
    repeated = np.unique(ordered[1:][ordered[1:] == ordered[:-1]] // (stride * (padded.shape[0] + 1)))
    if repeated.size == 0:
        return xy, offsets
    to_split = set(repeated.tolist())
    pieces: list[npt.NDArray[np.int64]] = []
    for index in range(offsets.size - 1):
        ring = xy[offsets[index] : offsets[index + 1]]
        if index in to_split:
            pieces.extend(_start_top_left(piece) for piece in _split_touching(ring))
        else:
            pieces.append(ring)
    lengths = np.array([len(piece) for piece in pieces], dtype=np.int64)
    return np.concatenate(pieces), np.concatenate(([0], np.cumsum(lengths)))


def _cycles(nxt: npt.NDArray[np.int64]) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    """For a permutation: each element's cycle id (its smallest member) and its position from that member,
    by pointer jumping (O(n log n) vectorised, no Python loop over elements)."""
    n = nxt.size
    rounds = max(1, math.ceil(math.log2(n)) + 1)
    label = np.arange(n, dtype=np.int64)
    jump = nxt.copy()
    for _ in range(rounds):
        label = np.minimum(label, label[jump])
        jump = jump[jump]
    # Cut each cycle before its smallest member, then rank by distance to the cut.
    link = nxt.copy()
    tail = nxt == label
    link[tail] = np.flatnonzero(tail)
    distance = (~tail).astype(np.int64)
    for _ in range(rounds):
        distance = distance + distance[link]
        link = link[link]
    return label, -distance  # smallest member first


def _split_touching(ring: npt.NDArray[np.int64]) -> list[npt.NDArray[np.int64]]:
    """A ring that passes a vertex twice (a diagonal corner) as the simple rings it is made of."""
    keys = (ring[:, 0] * (1 << 32) + ring[:, 1]).tolist()
    out: list[npt.NDArray[np.int64]] = []
    stack: list[int] = []
    seen: dict[int, int] = {}
    for index, key in enumerate(keys):
        if key in seen:
            at = seen[key]
            piece = stack[at:]
            out.append(ring[piece])
            for dropped in piece[1:]:
                del seen[keys[dropped]]
            del stack[at + 1 :]
        else:
            seen[key] = len(stack)
            stack.append(index)
    out.append(ring[stack])
    return out


def _start_top_left(ring: npt.NDArray[np.int64]) -> npt.NDArray[np.int64]:
    first = int(np.lexsort((ring[:, 0], ring[:, 1]))[0])
    return np.roll(ring, -first, axis=0)


def _signed_area2(ring: npt.NDArray[np.int64]) -> int:
    x, y = ring[:, 0], ring[:, 1]
    return int(np.dot(x, np.roll(y, -1)) - np.dot(np.roll(x, -1), y))


def _nest(
    xy: npt.NDArray[np.int64], offsets: npt.NDArray[np.int64], padded: BoolMask
) -> tuple[list[int], dict[int, list[int]]]:
    """Outer rings (in top-left order) and, for each, its holes (in top-left order).

    A hole's top-left edge has a foreground pixel p above it. Walking left from p along its row to the
    first background pixel crosses one vertical edge, of a ring R bounding p's 4-connected component: R is
    that component's outer ring, or another of its holes, whose own top edge is strictly higher. Following
    these links from the highest holes down finds every hole's outer ring.
    """
    count = offsets.size - 1
    ring_of = np.repeat(np.arange(count), np.diff(offsets))
    after = np.arange(1, xy.shape[0] + 1)
    after[offsets[1:] - 1] = offsets[:-1]
    x, y = xy[:, 0], xy[:, 1]
    x_next, y_next = x[after], y[after]
    area2 = np.add.reduceat(x * y_next - x_next * y, offsets[:-1])
    first = xy[offsets[:-1]]  # top-left vertices
    by_top_left = np.lexsort((first[:, 0], first[:, 1]))
    shells = [int(i) for i in by_top_left if area2[i] > 0]
    holes = [int(i) for i in by_top_left if area2[i] < 0]
    holes_of: dict[int, list[int]] = {}
    if not holes:
        return shells, holes_of
    # The left sides of foreground pixels, in (row, x) order: the run containing pixel (r, c) starts at
    # the last of them in row r at or before c.
    stride = padded.shape[1] + 1
    rows, lefts = np.nonzero(padded[1:-1, 1:] & ~padded[1:-1, :-1])
    left_keys = rows.astype(np.int64) * stride + lefts
    hx, hy = first[holes, 0], first[holes, 1]
    at = np.searchsorted(left_keys, (hy - 1) * stride + hx, side="right") - 1
    x_left = lefts[at].astype(np.int64)
    # Every vertical segment of every ring, in (x, y) order; at one x they never overlap.
    vertical = x == x_next
    vx, vlo = x[vertical], np.minimum(y, y_next)[vertical]
    vhi, vring = np.maximum(y, y_next)[vertical], ring_of[vertical]
    seg_order = np.lexsort((vlo, vx))
    vx, vlo, vhi, vring = vx[seg_order], vlo[seg_order], vhi[seg_order], vring[seg_order]
    height = padded.shape[0] + 1
    found_at = np.searchsorted(vx * height + vlo, x_left * height + (hy - 1), side="right") - 1
    if not ((vx[found_at] == x_left) & (vlo[found_at] <= hy - 1) & (hy - 1 < vhi[found_at])).all():
        raise AssertionError("hole without an enclosing ring")  # pragma: no cover
    owner: dict[int, int] = {}
    for hole, found in zip(holes, vring[found_at].tolist(), strict=True):
        parent = found if area2[found] > 0 else owner[found]
        owner[hole] = parent
        holes_of.setdefault(parent, []).append(hole)
    return shells, holes_of


def _simplify(
    xy: npt.NDArray[np.int64], offsets: npt.NDArray[np.int64], tolerance: float
) -> list[npt.NDArray[np.int64] | None]:
    """Douglas-Peucker on every ring at once: per ring, the indices (into the ring) of the vertices kept,
    or None when what is left has no area.

    Each ring is closed and split at its first vertex and the vertex farthest from it (the first such);
    then, level by level, every span whose farthest inner vertex (the first such) is more than `tolerance`
    px from the span's segment is split there: the recursive algorithm's result, vectorised over spans.
    """
    rings = offsets.size - 1
    lengths = np.diff(offsets)
    # Each ring followed by a copy of its first vertex: position offsets[i] + i + k in `points`.
    ring_of = np.repeat(np.arange(rings), lengths + 1)
    local = np.arange(ring_of.size) - np.repeat(offsets[:-1] + np.arange(rings), lengths + 1)
    source = offsets[ring_of] + np.where(local == lengths[ring_of], 0, local)
    points = xy[source].astype(np.float64)
    starts = offsets[:-1] + np.arange(rings)
    ends = starts + lengths
    away = ((points - points[starts[ring_of]]) ** 2).sum(axis=1)
    by_distance = np.lexsort((np.arange(away.size), -away, ring_of))
    first_of_ring = np.concatenate(([0], np.flatnonzero(np.diff(ring_of[by_distance])) + 1))
    far = by_distance[first_of_ring]
    kept = np.zeros(points.shape[0], dtype=np.bool_)
    kept[starts] = kept[ends] = kept[far] = True
    active = ~kept  # inner vertices of spans still to examine; a span within tolerance retires its vertices
    while True:
        inner = np.flatnonzero(active)
        if inner.size == 0:
            break
        anchors = np.flatnonzero(kept)
        span = np.searchsorted(anchors, inner) - 1
        a, b = points[anchors[span]], points[anchors[span + 1]]
        seg = b - a
        length2 = (seg * seg).sum(axis=1)
        t = np.clip(((points[inner] - a) * seg).sum(axis=1) / np.where(length2 == 0, 1, length2), 0.0, 1.0)
        dist = np.hypot(*(points[inner] - (a + t[:, None] * seg)).T)
        bounds = np.concatenate(([0], np.flatnonzero(np.diff(span)) + 1))  # `inner` is sorted: spans are runs
        group = np.repeat(np.arange(bounds.size), np.diff(np.append(bounds, inner.size)))
        best = np.maximum.reduceat(dist, bounds)
        at_best = np.flatnonzero(dist == best[group])
        first_best = at_best[np.concatenate(([True], np.diff(group[at_best]) != 0))]
        split = best > tolerance
        chosen = inner[first_best[split]]
        kept[chosen] = True
        active[chosen] = False
        active[inner[~split[group]]] = False
    result: list[npt.NDArray[np.int64] | None] = []
    for index in range(rings):
        keep = np.flatnonzero(kept[starts[index] : ends[index]])
        ring = xy[offsets[index] + keep]
        result.append(None if len(keep) < 3 or _signed_area2(ring) == 0 else keep)
    return result


# --- label map -------------------------------------------------------------------------------------------


def paint_order(areas: Sequence[int]) -> list[int]:
    """Segment ids in painting order: decreasing area, ties by increasing id (so smaller segments end on top)."""
    return sorted(range(len(areas)), key=lambda i: (-int(areas[i]), i))


def label_map(masks: PackedMaskSource, areas: Sequence[int]) -> npt.NDArray[np.uint16]:
    """uint16 HxW: 0 where no segment, else segment_id + 1 of the segment painted last at that pixel.

    Segments are painted in `paint_order(areas)`, streamed one packed mask at a time (only its bounding
    box is unpacked).
    """
    if len(areas) != len(masks):
        raise ValueError(f"areas has {len(areas)} entries for {len(masks)} masks")
    if len(masks) > MAX_LABELS:
        raise ValueError(f"a 16-bit label map holds at most {MAX_LABELS} segments, got {len(masks)}")
    labels = np.zeros((masks.height, masks.width), dtype=np.uint16)
    for index in paint_order(areas):
        cropped = _crop_packed(masks.read(index), masks.width)
        if cropped is None:
            continue
        x0, y0, sub = cropped
        window = labels[y0 : y0 + sub.shape[0], x0 : x0 + sub.shape[1]]
        window[sub] = index + 1
    return labels


def encode_label_map_png(labels: npt.NDArray[np.uint16]) -> bytes:
    """A 16-bit grayscale PNG (big-endian samples, as PNG requires) of the label map."""
    if labels.ndim != 2 or labels.dtype != np.uint16:
        raise ValueError(f"labels must be a 2-D uint16 array, got {labels.dtype} {labels.shape}")
    height, width = labels.shape
    rows = np.zeros((height, 1 + 2 * width), dtype=np.uint8)  # column 0: filter type 0
    rows[:, 1:] = labels.astype(">u2").view(np.uint8).reshape(height, 2 * width)
    header = struct.pack(">IIBBBBB", width, height, 16, 0, 0, 0, 0)
    return b"".join(
        (
            PNG_SIGNATURE,
            _chunk(b"IHDR", header),
            _chunk(b"IDAT", zlib.compress(rows.tobytes(), PNG_COMPRESS_LEVEL)),
            _chunk(b"IEND", b""),
        )
    )


def decode_label_map_png(data: bytes) -> npt.NDArray[np.uint16]:
    """A label map PNG back to uint16 HxW (what a client does with Pillow)."""
    with Image.open(io.BytesIO(data)) as image:
        if image.mode not in ("I;16", "I;16B", "I"):
            raise ValueError(f"not a 16-bit grayscale PNG (mode {image.mode})")
        return np.asarray(image).astype(np.uint16)


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


# --- overlay ---------------------------------------------------------------------------------------------


def segment_colors(count: int) -> npt.NDArray[np.uint8]:
    """(count + 1, 3) RGB: row 0 unused (no segment), row i + 1 the colour of segment i (golden-ratio hues)."""
    colors = np.zeros((count + 1, 3), dtype=np.uint8)
    for index in range(count):
        r, g, b = colorsys.hsv_to_rgb((index * 0.618033988749895) % 1.0, 0.75, 1.0)
        colors[index + 1] = (round(r * 255), round(g * 255), round(b * 255))
    return colors


def overlay_size(width: int, height: int, max_side: int = OVERLAY_MAX_SIDE) -> tuple[int, int]:
    """(width, height) of the overlay: the image's, scaled down (never up) so the long side is <= max_side."""
    scale = min(1.0, max_side / max(width, height))
    return max(1, round(width * scale)), max(1, round(height * scale))


def overlay(
    image: Image.Image | npt.NDArray[np.uint8],
    masks: PackedMaskSource,
    areas: Sequence[int],
    *,
    max_side: int = OVERLAY_MAX_SIDE,
    quality: int = OVERLAY_JPEG_QUALITY,
) -> bytes:
    """JPEG preview: the image with every segment filled in its colour (label-map painting order)."""
    return overlay_from_labels(image, label_map(masks, areas), max_side=max_side, quality=quality)


def overlay_from_labels(
    image: Image.Image | npt.NDArray[np.uint8],
    labels: npt.NDArray[np.uint16],
    *,
    max_side: int = OVERLAY_MAX_SIDE,
    quality: int = OVERLAY_JPEG_QUALITY,
    alpha: float = OVERLAY_ALPHA,
) -> bytes:
    """The overlay from an already computed label map (the same size as the image)."""
    picture = image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image))
    picture = picture.convert("RGB")
    height, width = labels.shape
    if picture.size != (width, height):
        raise ValueError(f"image is {picture.size[0]}x{picture.size[1]}, labels are {width}x{height}")
    size = overlay_size(width, height, max_side)
    if size != picture.size:
        picture = picture.resize(size, Image.Resampling.BILINEAR, reducing_gap=2.0)
    rows = ((np.arange(size[1]) + 0.5) * height / size[1]).astype(np.int64)
    cols = ((np.arange(size[0]) + 0.5) * width / size[0]).astype(np.int64)
    small = labels[rows[:, None], cols[None, :]]
    colors = segment_colors(int(labels.max()))
    rgb = np.asarray(picture, dtype=np.float32)
    covered = small > 0
    blended = rgb.copy()
    blended[covered] = (1 - alpha) * rgb[covered] + alpha * colors[small[covered]]
    # Outline each segment in its full colour, so that neighbours of similar hue stay apart.
    edge = np.zeros_like(covered)
    edge[:, 1:] |= small[:, 1:] != small[:, :-1]
    edge[1:, :] |= small[1:, :] != small[:-1, :]
    edge &= covered
    blended[edge] = colors[small[edge]]
    out = io.BytesIO()
    Image.fromarray(np.clip(blended + 0.5, 0, 255).astype(np.uint8)).save(out, format="JPEG", quality=quality)
    return out.getvalue()


# --- one segment's encodings -----------------------------------------------------------------------------


@dataclass(frozen=True)
class SegmentEncodings:
    """What result.json's segment gains: set fields only for the outputs asked for."""

    rle: CocoRle | None = None
    polygons: MultiPolygonCoords | None = None
    polygons_error: ErrorInfo | None = None


def encode_segment(
    packed: npt.NDArray[np.uint8],
    width: int,
    *,
    rle: bool,
    polygons: bool,
    tolerance: float = 0.0,
    max_vertices: int = DEFAULT_MAX_VERTICES,
) -> SegmentEncodings:
    """The per-segment outputs of one packed mask; a too-complex outline becomes `polygons_error`."""
    encoded_rle = CocoRle.model_validate(coco_rle_packed(packed, width)) if rle else None
    if not polygons:
        return SegmentEncodings(rle=encoded_rle)
    try:
        coords = polygons_packed(packed, width, tolerance, max_vertices=max_vertices)
    except PolygonTooComplex as exc:
        return SegmentEncodings(rle=encoded_rle, polygons_error=ErrorInfo(code=exc.code, message=str(exc)))
    return SegmentEncodings(rle=encoded_rle, polygons=coords)
