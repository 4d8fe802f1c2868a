"""Peak memory of one segment stage at the pixel cap: every mask at full resolution vs masks written as made.

issue #15: the segment stage held every full-resolution bool mask before packing them (~40 MB each at 40 MP,
~4 GB at 100 masks). `Segmenter.segment_packed` writes each mask, bit-packed per row, as soon as it is built.

Real path, no synthetic masks: the real model (random weights: `write_random_checkpoint`), the real generator
and the real packed-masks file. Random weights with every filter off keep 3 masks per grid point, so a 6x6 grid
gives ~100 masks. Each variant runs in its own process; peak RSS is the process's ru_maxrss, "model" is the RSS
after loading the model and one warm-up inference, and the figure that matters is peak - model.

    python benchmarks/segment_memory.py                  # 40 MP (7304x5477), 6x6 points, previous vs now
    python benchmarks/segment_memory.py --size 4000x3000 --points-per-side 4   # quicker
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

VARIANTS = ("previous", "now")


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def child(args: argparse.Namespace) -> int:
    from samseg.core.masks import write_packed_masks
    from samseg.core.settings import Settings
    from samseg.runtime.segmenter import Segmenter

    settings = Settings(_env_file=None)
    seg = Segmenter(settings)
    seg.warm_up()
    w, h = (int(v) for v in args.size.lower().split("x"))
    rng = np.random.default_rng(0)
    # Smooth colour field + noise: the content does not matter for memory; random weights make the masks.
    image = (rng.integers(0, 255, (h // 64 + 1, w // 64 + 1, 3), dtype=np.uint8).repeat(64, 0).repeat(64, 1))[:h, :w]
    image = np.ascontiguousarray(image)
    model_rss = _rss()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "masks.npy"
        t0 = time.perf_counter()
        if args.variant == "previous":  # samseg/worker/stages.py `segment` before issue #15
            result = seg.segment_with_fallback(image)
            count = len(result.masks)
            write_packed_masks(path, result.masks, count, h, w)
            result.masks.clear()
        else:
            count = seg.segment_packed_with_fallback(image, path).count
        seconds = time.perf_counter() - t0
        size = path.stat().st_size
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"model_rss": model_rss, "peak_rss": peak, "masks": count, "seconds": seconds, "file": size}))
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="7304x5477", help="WxH (default: 40 MP, samseg's max_image_pixels)")
    p.add_argument("--points-per-side", type=int, default=6)
    p.add_argument("--model", default="sam2.1_hiera_tiny")
    p.add_argument("--cache", default=str(Path(tempfile.gettempdir()) / "samseg-bench"))
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.variant:
        return child(args)
    from samseg.runtime.build import write_random_checkpoint

    ckpt = Path(args.cache) / f"{args.model}-seed0.pt"
    if not ckpt.is_file():
        write_random_checkpoint(args.model, ckpt, 0)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SAMSEG_")}
    env.update(
        PYTHONPATH=str(ROOT),
        SAMSEG_SAM2_MODEL=args.model,
        SAMSEG_SAM2_CHECKPOINT=str(ckpt),
        SAMSEG_DEVICE="cpu",
        SAMSEG_AMG_POINTS_PER_SIDE=str(args.points_per_side),
        SAMSEG_AMG_PRED_IOU_THRESH="0",
        SAMSEG_AMG_STABILITY_SCORE_THRESH="0",
        SAMSEG_AMG_BOX_NMS_THRESH="1",
        SAMSEG_LOG_LEVEL="WARNING",
    )
    print(f"# segment memory, {args.size}, {args.points_per_side}^2 points, filters off, {args.model} random weights")
    rows = []
    for _ in range(args.repeats):
        for variant in VARIANTS:
            load = Path("/proc/loadavg").read_text().split()[0]
            cmd = [sys.executable, str(Path(__file__).resolve()), "--variant", variant, "--size", args.size]
            done = subprocess.run(cmd, env=env, capture_output=True, text=True)
            if done.returncode != 0:
                print(done.stderr[-3000:], file=sys.stderr)
                return 1
            r = json.loads(done.stdout.strip().splitlines()[-1])
            rows.append((variant, r, load))
            print(f"#   {variant}: {r}", flush=True)
    mib = 2**20
    print(
        "\n| variant | masks | model RSS (MiB) | peak RSS (MiB) | peak - model (MiB) | segment s | file (MiB) | load |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for variant, r, load in rows:
        print(
            f"| {variant} | {r['masks']} | {r['model_rss'] / mib:.0f} | {r['peak_rss'] / mib:.0f} | "
            f"{(r['peak_rss'] - r['model_rss']) / mib:.0f} | {r['seconds']:.1f} | {r['file'] / mib:.0f} | {load} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
