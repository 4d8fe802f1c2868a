"""The `samseg` command: run the local stack, submit jobs, segment one image, manage weights and queues."""

# Each command group lives in its own module and registers its own subcommands. This module imports only
# those (stdlib-only at import time): the settings (pydantic), the Celery app, boto3 and torch are imported
# by the command that runs, after the arguments are parsed, so `samseg --help` and a typo answer at once.

from __future__ import annotations

import argparse
from collections.abc import Sequence

from samseg.cli import admin, health, jobs, segment, stack


def build_parser() -> argparse.ArgumentParser:
    """Every subcommand, in the order `samseg --help` lists them."""
    parser = argparse.ArgumentParser(prog="samseg", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    stack.register(sub)
    jobs.register_submit(sub)
    segment.register(sub)
    admin.register_weights(sub)
    admin.register_queues_and_init(sub)
    health.register(sub)
    jobs.register_status(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from samseg.core.logs import configure_logging
    from samseg.core.settings import get_settings

    settings = get_settings()
    configure_logging(settings.log_level, settings.log_json)
    result: int = args.func(args, settings)
    return result
