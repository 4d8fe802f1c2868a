"""`samseg healthcheck …`: Docker's HEALTHCHECK, so it must start fast and import nothing it does not read."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from samseg.core.settings import Settings


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    health = sub.add_parser("healthcheck", help="exit 0 if healthy (for Docker HEALTHCHECK)")
    hsub = health.add_subparsers(dest="health_command", required=True)
    hworker = hsub.add_parser("worker", help="this container's worker: heartbeat fresh and model warm")
    hworker.add_argument("--live", action="store_true", help="liveness only: do not require the model to be ready")
    hworker.set_defaults(func=cmd_healthcheck_worker)


def cmd_healthcheck_worker(args: argparse.Namespace, settings: Settings) -> int:
    from samseg.ops.health import worker_health

    health = worker_health(settings.worker_heartbeat_file, settings.worker_heartbeat_interval_seconds)
    print(health.reason)
    return 0 if health.alive and (health.ready or args.live) else 1
