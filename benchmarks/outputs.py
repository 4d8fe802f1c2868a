"""Benchmark the optional outputs of issue #16 (samseg.core.outputs): time and size per encoding.

For 100 masks at 1024x768 and at 12 MP (4000x3000), streamed from a packed-mask file as persist reads them:
COCO RLE, polygons at tolerance 0 and 1, the 16-bit label map PNG and the JPEG overlay, next to the mask PNGs
samseg already writes. Masks look like SAM segments: a few blobs with wavy, pixel-jagged outlines, some
with small holes and specks. Prints a markdown table (docs/outputs.md keeps one); nothing is asserted.

    python benchmarks/outputs.py              # both sizes, 100 masks (~2-3 min on 2 cores)
    python benchmarks/outputs.py --count 20 --sizes 1024x768
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from samseg.core.masks import PackedMasks, encode_packed_png, packed_geometry, write_packed_masks  # noqa: E402
from samseg.core.outputs import (  # noqa: E402
    coco_rle_packed,
    encode_label_map_png,
    label_map,
    overlay_from_labels,
    polygons_packed,
)


def segment_like_masks(count: int, height: int, width: int, seed: int = 0) -> Iterator[np.ndarray]:
    rng = np.random.default_rng(seed)
    scale = min(height, width)
    for index in range(count):
        mask = np.zeros((height, width), dtype=bool)
        for _ in range(int(rng.integers(1, 3))):
            cy, cx = rng.uniform(0.1, 0.9) * height, rng.uniform(0.1, 0.9) * width
            radius = rng.uniform(0.03, 0.3) * scale
            # Computed in the blob's box only (the wobble is at most 1.48x the radius).
            y0, y1 = max(0, int(cy - 1.5 * radius)), min(height, int(cy + 1.5 * radius) + 1)
            x0, x1 = max(0, int(cx - 1.5 * radius)), min(width, int(cx + 1.5 * radius) + 1)
            yy, xx = np.ogrid[y0:y1, x0:x1]
            angle = np.arctan2(yy - cy, xx - cx)
            wobble = 1 + sum(rng.uniform(0.02, 0.12) * np.sin(k * angle + rng.uniform(0, 6.3)) for k in (3, 7, 17, 41))
            mask[y0:y1, x0:x1] |= (yy - cy) ** 2 + (xx - cx) ** 2 < (radius * wobble) ** 2
        if index % 3 == 0:  # holes and specks, as SAM leaves them around thin structures
            for _ in range(20):
                y, x = int(rng.integers(0, height - 8)), int(rng.integers(0, width - 8))
                size = int(rng.integers(1, 6))
                mask[y : y + size, x : x + size] ^= True
        yield mask


def timed(fn: Callable[[], int]) -> tuple[float, int]:
    start = time.perf_counter()
    size = fn()
    return time.perf_counter() - start, size


def run(count: int, height: int, width: int, folder: Path) -> list[tuple[str, float, int, str]]:
    path = folder / f"masks-{height}x{width}.npy"
    write_packed_masks(path, segment_like_masks(count, height, width), count, height, width)
    masks = PackedMasks(path, width)
    areas = []
    for i in range(count):
        geometry = packed_geometry(masks.read(i), width)
        assert geometry is not None
        areas.append(geometry.area)
    rows: list[tuple[str, float, int, str]] = []

    def each(encode: Callable[[np.ndarray], int]) -> Callable[[], int]:
        return lambda: sum(encode(masks.read(i)) for i in range(count))

    seconds, size = timed(each(lambda p: len(encode_packed_png(p, width))))
    rows.append(("mask PNGs (already written today)", seconds, size, ""))
    seconds, size = timed(each(lambda p: len(json.dumps(coco_rle_packed(p, width)))))
    rows.append(("coco_rle (JSON)", seconds, size, ""))
    for tolerance in (0.0, 1.0):
        vertices: list[int] = []

        def encode(p: np.ndarray, tolerance: float = tolerance, vertices: list[int] = vertices) -> int:
            coords = polygons_packed(p, width, tolerance, max_vertices=10_000_000)
            vertices.append(sum(len(r) - 1 for polygon in coords for r in polygon))
            return len(json.dumps(coords, separators=(",", ":")))

        seconds, size = timed(each(encode))
        note = f"vertices/mask: median {statistics.median(vertices):.0f}, max {max(vertices)}"
        rows.append((f"polygons tol {tolerance:g} (JSON)", seconds, size, note))
    labels_holder: list[np.ndarray] = []

    def labels_png() -> int:
        labels = label_map(masks, areas)
        labels_holder.append(labels)
        return len(encode_label_map_png(labels))

    seconds, size = timed(labels_png)
    rows.append(("label_map (paint + 16-bit PNG)", seconds, size, "one file per job"))
    rng = np.random.default_rng(1)
    image = (
        np.linspace(0, 200, width, dtype=np.float32)[None, :, None]
        + rng.integers(0, 50, (height, 1, 3)).astype(np.float32)
    ).astype(np.uint8)
    image = np.ascontiguousarray(np.broadcast_to(image, (height, width, 3)))
    seconds, size = timed(lambda: len(overlay_from_labels(image, labels_holder[0])))
    rows.append(("overlay (from the label map, JPEG)", seconds, size, "one file per job; plus the label map"))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=100)
    parser.add_argument("--sizes", default="1024x768,4000x3000", help="WIDTHxHEIGHT,…")
    args = parser.parse_args()
    print(f"{args.count} masks per size; times are totals for all masks, one core")
    print()
    print("| image | output | total s | per mask ms | total bytes | notes |")
    print("|---|---|---:|---:|---:|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.sizes.split(","):
            width, height = (int(v) for v in size.split("x"))
            for name, seconds, nbytes, note in run(args.count, height, width, Path(tmp)):
                per = f"{1000 * seconds / args.count:.1f}" if "one file" not in note else "-"
                print(f"| {width}x{height} | {name} | {seconds:.2f} | {per} | {nbytes:,} | {note} |", flush=True)


if __name__ == "__main__":
    main()
