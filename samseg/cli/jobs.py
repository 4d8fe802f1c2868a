"""`samseg submit` and `samseg status`: a job from the outside, as the app server sees it (SQS in, status out)."""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from samseg.core.settings import Settings


def register_submit(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    submit = sub.add_parser("submit", help="put a job on the jobs queue, as the app server would")
    submit.add_argument("--uuid", required=True)
    submit.add_argument("--image-url", required=True)
    submit.set_defaults(func=cmd_submit)


def register_status(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    status = sub.add_parser("status", help="print a job's status as JSON")
    status.add_argument("uuid")
    status.set_defaults(func=cmd_status)


def cmd_submit(args: argparse.Namespace, settings: Settings) -> int:
    from samseg.core.contracts import JobMessage
    from samseg.queue.sqs import JobQueues

    job = JobMessage(uuid=args.uuid, image_url=args.image_url)
    message_id = JobQueues(settings).send_job(job.model_dump())
    print(f"queued {job.uuid} on {settings.jobs_queue} (message {message_id})")
    return 0


def cmd_status(args: argparse.Namespace, settings: Settings) -> int:
    from samseg.stores import build_stores

    status = build_stores(settings).jobs.status(args.uuid)
    if status is None:
        print(f"unknown job {args.uuid}", file=sys.stderr)
        return 1
    print(status.model_dump_json(indent=2, exclude_none=True))
    return 0
