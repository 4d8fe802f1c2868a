"""`samseg segment`: one image through the pipeline's own pieces, with no queue, store or callback.

Download and decoding (samseg.transfer.image_fetch), the model (samseg.runtime.segmenter, with the worker's
out-of-memory fallback) and the result (samseg.stores.results) are the ones a job uses, so a folder written
here is what a job publishes, except that each `mask_url` is the PNG's file:// URI.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from samseg.core.settings import Settings


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    segment = sub.add_parser("segment", help="segment one image (file or URL) without a queue")
    segment.add_argument("image", help="path or http(s) URL of the image")
    segment.add_argument("--out", required=True, type=Path, help="folder for mask_images/ and result.json")
    segment.add_argument("--uuid", default="local", help="job id written into result.json (default: local)")
    segment.set_defaults(func=cmd_segment)


def cmd_segment(args: argparse.Namespace, settings: Settings) -> int:
    import tempfile
    from urllib.parse import urlsplit

    from samseg.core.contracts import JobMessage
    from samseg.core.errors import JobError
    from samseg.core.masks import PackedMasks, mask_filename
    from samseg.runtime.segmenter import get_segmenter
    from samseg.stores.results import MASK_DIR, completed_body, write_job_folder
    from samseg.transfer.image_fetch import download_image, load_rgb

    JobMessage(uuid=args.uuid, image_url="x")  # validates the id used in result.json
    folder = Path(args.out).resolve()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            source = Path(args.image)
            if urlsplit(args.image).scheme in {"http", "https"}:
                source = Path(tmp) / "source"
                download_image(args.image, source, settings)
            elif not source.is_file():
                raise JobError("image_not_found", f"{source} is not a file")
            image = load_rgb(source, settings)
            height, width = image.shape[:2]
            try:
                result = get_segmenter(settings).segment_packed_with_fallback(image, Path(tmp) / "masks.npy")
            except JobError:
                raise
            except Exception as exc:  # as the segment stage words it (samseg.worker.stages)
                raise JobError("model_error", f"mask generation failed: {type(exc).__name__}: {exc}") from exc
            masks = PackedMasks(Path(tmp) / "masks.npy", width)
            body = completed_body(
                args.uuid,
                masks,
                result.predicted_iou.tolist(),
                result.stability_score.tolist(),
                lambda i: (folder / MASK_DIR / mask_filename(i)).as_uri(),
                height,
            )
            write_job_folder(folder, masks, body)
    except JobError as exc:
        print(f"error: {exc.code}: {exc.message}", file=sys.stderr)
        return 1
    print(f"{len(body.segments)} masks in {result.seconds:.1f} s → {folder}")
    return 0
