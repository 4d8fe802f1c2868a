"""Deployment chores: `samseg init`, `samseg queues …` and `samseg weights …` (and the weights check `up` runs)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from samseg.core.settings import Settings


def register_weights(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    weights = sub.add_parser("weights", help="SAM-2 checkpoints")
    wsub = weights.add_subparsers(dest="weights_command", required=True)
    wdl = wsub.add_parser("download", help="download a checkpoint from Meta (SHA-256 verified)")
    wdl.add_argument("model", nargs="?", help="model name (default: SAMSEG_SAM2_MODEL)")
    wdl.add_argument("--dest", type=Path, help="where to write it (default: SAMSEG_SAM2_CHECKPOINT)")
    wdl.set_defaults(func=cmd_weights_download)
    wens = wsub.add_parser("ensure", help="download the configured checkpoint if it is missing (file-locked)")
    wens.set_defaults(func=cmd_weights_ensure)


def register_queues_and_init(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    queues = sub.add_parser("queues", help="SQS queues")
    qsub = queues.add_subparsers(dest="queues_command", required=True)
    qens = qsub.add_parser("ensure", help="create the jobs queue, its dead-letter queue and Celery's queues")
    qens.set_defaults(func=cmd_queues_ensure)

    init = sub.add_parser("init", help="create queues, dead-letter queues and the job table; check the blob store")
    init.add_argument("--create-bucket", action="store_true", help="create the S3 bucket if it does not exist (dev)")
    init.set_defaults(func=cmd_init)
    qsweep = qsub.add_parser(
        "sweep-events", help="delete Flower event queues left behind by killed Flower processes (SAMSEG_EVENTS)"
    )
    qsweep.add_argument("--min-backlog", type=int, default=500, help="queues with at least this many messages")
    qsweep.set_defaults(func=cmd_queues_sweep_events)


# --- queues and init ---------------------------------------------------------------------------------------
def cmd_queues_ensure(args: argparse.Namespace, settings: Settings) -> int:
    from samseg.queue.sqs import JobQueues

    for name, url in JobQueues(settings).ensure().items():
        print(f"{name}\t{url}")
    return 0


def cmd_queues_sweep_events(args: argparse.Namespace, settings: Settings) -> int:
    from samseg.queue.events import sweep_event_queues
    from samseg.worker.app import get_app

    for name in sweep_event_queues(get_app(), settings, min_backlog=args.min_backlog):
        print(f"deleted {name}")
    return 0


def cmd_init(args: argparse.Namespace, settings: Settings) -> int:
    """Everything a deployment needs before its first job: queues, DLQs, the job table (and bucket if asked)."""
    from samseg.stores import build_stores

    cmd_queues_ensure(args, settings)
    stores = build_stores(settings)
    if args.create_bucket and settings.storage_url:
        from samseg.stores.blobs import S3Blobs

        blobs = stores.blobs
        assert isinstance(blobs, S3Blobs)
        try:
            blobs.check()
        except Exception:
            blobs.client.create_bucket(Bucket=blobs.bucket)
            print(f"bucket\ts3://{blobs.bucket} created")
    stores.jobs.ensure()
    print(f"job store\t{stores.jobs.backend.describe()}")
    print(f"blob store\t{stores.blobs.check()}")
    return 0


# --- weights -------------------------------------------------------------------------------------------------
def cmd_weights_download(args: argparse.Namespace, settings: Settings) -> int:
    from samseg.runtime.weights import WeightsError, download_checkpoint

    model = args.model or settings.sam2_model
    dest = args.dest or (settings.checkpoint_path if model == settings.sam2_model else Path("weights") / f"{model}.pt")
    try:
        path = download_checkpoint(model, dest, base_url=settings.weights_base_url, progress=sys.stderr.isatty())
    except WeightsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"{model}: {path}")
    return 0


def cmd_weights_ensure(args: argparse.Namespace, settings: Settings) -> int:
    path = ensure_weights(settings)
    if path is None:
        return 1
    print(f"{settings.sam2_model}: {path}")
    return 0


def ensure_weights(settings: Settings) -> Path | None:
    """The configured checkpoint, downloaded if it is Meta's and missing; None (after saying why) if not."""
    from samseg.runtime.weights import WeightsError, ensure_configured

    try:
        return ensure_configured(settings, progress=sys.stderr.isatty())
    except WeightsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return None
