"""Benchmark the persist stage's storage path (issues 8 and 10): masks → PNGs → blob store.

Prints two tables, each "previous way" vs "samseg now", measured in the same run on the same machine:

1. Wall time to publish 100 full-size masks (1024x768) to a local directory and to S3 (a moto server on
   loopback: the S3 protocol is real, the network is not AWS's), with one upload at a time (what a naive
   loop does, and what boto3's default pool of 10 connections caps a wider pool at) vs SAMSEG_S3_MAX_CONCURRENCY
   threads with the connection pool sized to match.
2. Peak RSS of the whole persist stage (read the packed masks, measure geometry, encode, upload) for 100
   masks at the 40 MP pixel cap, in a fresh process each: samseg's packed, one-mask-at-a-time path vs the
   previous one (unpack every mask to a full-resolution bool array first, as persist did before this
   change). The previous way needs ~8 GB at 40 MP; it runs only if `--old-at-40mp` is given.

Default run (~2-4 min on 2 cores):  python benchmarks/persist.py
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def blob_masks(count: int, height: int, width: int, seed: int = 0) -> list[np.ndarray]:
    """Masks that look like segments: a few discs and boxes each, so PNGs compress like real ones."""
    rng = np.random.default_rng(seed)
    yy, xx = np.ogrid[:height, :width]
    masks = []
    for _ in range(count):
        mask = np.zeros((height, width), dtype=bool)
        for _ in range(int(rng.integers(1, 4))):
            cy, cx = rng.uniform(0, height), rng.uniform(0, width)
            r = rng.uniform(0.02, 0.25) * min(height, width)
            mask |= (yy - cy) ** 2 + (xx - cx) ** 2 < r * r
        if not mask.any():
            mask[0, 0] = True
        masks.append(mask)
    return masks


def packed_file(folder: Path, count: int, height: int, width: int) -> Path:
    from samseg.core.masks import write_packed_masks

    path = folder / f"masks-{count}-{height}x{width}.npy"
    if not path.exists():
        # Built in slices so that even the 40 MP file never holds more than a few masks in memory.
        rng = np.random.default_rng(1)

        def gen() -> Iterator[np.ndarray]:
            for i in range(count):
                mask = np.zeros((height, width), dtype=bool)
                y0, x0 = int(rng.integers(0, height // 2)), int(rng.integers(0, width // 2))
                mask[y0 : y0 + height // 3, x0 : x0 + width // (3 + i % 5)] = True
                yield mask

        write_packed_masks(path, gen(), count, height, width)
    return path


def _body(uuid: str, count: int):  # type: ignore[no-untyped-def]
    from samseg.core.contracts import CallbackBody

    return CallbackBody(uuid=uuid, status="completed", segments=[])


def time_publish(blobs, masks_path: Path, width: int, repeats: int) -> float:  # type: ignore[no-untyped-def]
    from samseg.core.masks import PackedMasks
    from samseg.stores.layout import Assets

    masks = PackedMasks(masks_path, width)
    times = []
    for _ in range(repeats):
        uuid = f"bench-{secrets.token_hex(3)}"
        started = time.perf_counter()
        Assets(blobs).publish(uuid, masks, _body(uuid, len(masks)))
        times.append(time.perf_counter() - started)
        Assets(blobs).remove_job(uuid)
    return statistics.median(times)


def s3_blobs(endpoint: str, bucket: str, concurrency: int):  # type: ignore[no-untyped-def]
    import boto3
    from botocore.config import Config

    from samseg.stores.blobs import S3Blobs

    client = boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id="bench",
        aws_secret_access_key="bench",
        config=Config(max_pool_connections=concurrency + 4),
    )
    return S3Blobs(client, bucket, "bench", concurrency=concurrency)


def upload_table(work: Path, repeats: int) -> list[str]:
    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # moto's request log

    from samseg.stores.blobs import LocalBlobs
    from tests.support import free_port

    masks_path = packed_file(work, 100, 768, 1024)
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    try:
        import boto3

        boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="b",
                     aws_secret_access_key="b").create_bucket(Bucket="bench")  # fmt: skip
        cores = min(8, os.cpu_count() or 1)
        rows = [
            f"| store | one write at a time | samseg (local: {cores} threads; S3: 16 threads, pool 20) | speed-up |",
            "|---|---|---|---|",
        ]
        for name, old, new in (
            ("local directory", LocalBlobs(work / "old", concurrency=1), LocalBlobs(work / "new")),
            ("S3 (moto, loopback)", s3_blobs(endpoint, "bench", 1), s3_blobs(endpoint, "bench", 16)),
        ):
            before = time_publish(old, masks_path, 1024, repeats)
            after = time_publish(new, masks_path, 1024, repeats)
            rows.append(f"| {name} | {before * 1000:.0f} ms | {after * 1000:.0f} ms | {before / after:.1f}x |")
    finally:
        server.stop()
    return rows


def rss_child(masks_path: str, width: int, mode: str) -> None:
    """One persist in this fresh process; prints its peak RSS (MiB) as JSON."""
    from samseg.core.masks import PackedMasks, encode_png, mask_geometry
    from samseg.stores.blobs import LocalBlobs
    from samseg.stores.layout import Assets
    from samseg.stores.results import describe_segments

    out = Path(tempfile.mkdtemp(prefix="persist-rss-"))
    masks = PackedMasks(Path(masks_path), width)
    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    started = time.perf_counter()
    if mode == "samseg":
        segments = describe_segments(masks, [0.5] * len(masks), [0.5] * len(masks), lambda i: f"u{i}")
        Assets(LocalBlobs(out)).publish("job", masks, _body("job", len(segments)))
    else:  # the previous persist: every mask unpacked to bool at once, then geometry and PNGs from those
        unpacked = np.unpackbits(np.load(masks_path), axis=-1, count=width).astype(bool)
        for mask in unpacked:
            mask_geometry(mask)
        (out / "mask_images").mkdir()
        for i, mask in enumerate(unpacked):
            (out / "mask_images" / f"mask_{i:03d}.png").write_bytes(encode_png(mask))
    seconds = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"peak_mib": peak, "baseline_mib": baseline, "seconds": seconds}))


def rss_table(work: Path, old_at_40mp: bool) -> list[str]:
    rows = ["| masks | size | previous persist: peak RSS | samseg: peak RSS | samseg time |", "|---|---|---|---|---|"]
    for count, (height, width) in ((100, (768, 1024)), (100, (5480, 7300))):
        path = packed_file(work, count, height, width)
        result: dict[str, dict[str, float] | None] = {}
        for mode in ("previous", "samseg"):
            if mode == "previous" and height * width > 4_000_000 and not old_at_40mp:
                result[mode] = None
                continue
            out = subprocess.run(
                [sys.executable, __file__, "--rss-child", str(path), str(width), mode],
                capture_output=True, text=True, check=True, env={**os.environ, "PYTHONPATH": str(ROOT)},
            )  # fmt: skip
            result[mode] = json.loads(out.stdout.strip().splitlines()[-1])
        old = result["previous"]
        new = result["samseg"]
        assert new is not None
        old_text = f"{old['peak_mib']:.0f} MiB" if old else f"not run (≈{count * height * width * 2 / 2**30:.0f} GiB)"
        rows.append(
            f"| {count} | {width}x{height} ({height * width / 1e6:.0f} MP) | {old_text} | "
            f"{new['peak_mib']:.0f} MiB | {new['seconds']:.1f} s |"
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--old-at-40mp", action="store_true", help="also run the previous persist at 40 MP (~8 GB)")
    parser.add_argument("--rss-child", nargs=3, metavar=("PATH", "WIDTH", "MODE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rss_child:
        rss_child(args.rss_child[0], int(args.rss_child[1]), args.rss_child[2])
        return
    with tempfile.TemporaryDirectory(prefix="samseg-persist-bench-") as tmp:
        work = Path(tmp)
        print(f"# persist benchmark, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {os.cpu_count()} cores")
        print("\n## Publishing 100 full-size masks (1024x768), median of", args.repeats)
        print("\n".join(upload_table(work, args.repeats)))
        print("\n## Peak RSS of one persist (fresh process each; RSS includes the interpreter, ~90 MiB)")
        print("\n".join(rss_table(work, args.old_at_40mp)))


if __name__ == "__main__":
    main()
