"""`samseg up`: the whole service on one machine (local SQS, an I/O worker, a segment worker, beat, the API)."""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shlex
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from samseg.cli.admin import ensure_weights
from samseg.cli.supervisor import Supervisor, free_port, wait_port

if TYPE_CHECKING:
    from samseg.core.settings import Settings

# Measured on a 2-core x86_64 machine with sam2.1_hiera_tiny (README, "Performance"): ~3 s for the image
# encoder plus, per grid point, ~0.1 s in upstream's generator and ~0.03 s in samseg's.
CPU_ENCODER_SECONDS = 3.0
CPU_SECONDS_PER_POINT = {"upstream": 0.1, "fast": 0.03}
CPU_DEFAULT_POINTS_PER_SIDE = 16


def estimate_cpu_seconds(points_per_side: int, cores: int, impl: str) -> float:
    scale = 2 / max(1, cores)
    return (CPU_ENCODER_SECONDS + CPU_SECONDS_PER_POINT[impl] * points_per_side**2) * scale


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    up = sub.add_parser("up", help="run SQS (moto, unless configured), a worker, beat and the API on this machine")
    up.add_argument("--host", default="127.0.0.1", help="API bind address (default 127.0.0.1)")
    up.add_argument("--port", type=int, default=8000, help="API port (default 8000)")
    up.add_argument("--aws", action="store_true", help="use real AWS SQS (credentials from the usual chain)")
    up.set_defaults(func=cmd_up)


@dataclass(frozen=True)
class WorkerCommand:
    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)


def up_worker_commands(jobs_queue: str, io_queue: str, gpu_queue: str, celery: list[str]) -> dict[str, WorkerCommand]:
    """The two workers `samseg up` starts (benchmarks/pipeline.py runs exactly these)."""
    return {
        "worker-io": WorkerCommand(
            [
                *celery,
                "worker",
                "-Q",
                f"{jobs_queue},{io_queue}",
                "--concurrency",
                "4",
                "--pool",
                "threads",
                "--hostname",
                "io@%h",
            ]
        ),
        "worker-segment": WorkerCommand(
            # One pool process with the model; a second message waits in the main process (the visibility
            # keeper extends it too), so the next task starts the moment one ends, without an SQS round trip.
            [
                *celery,
                "worker",
                "-Q",
                gpu_queue,
                "--concurrency",
                "1",
                "--prefetch-multiplier",
                "2",
                "--hostname",
                "segment@%h",
            ]
        ),
    }


def cmd_up(args: argparse.Namespace, settings: Settings) -> int:
    from samseg.core.settings import get_settings

    env = dict(os.environ)
    overrides: dict[str, str] = {}
    if not settings.aws_endpoint_url_sqs and not args.aws:
        missing = _missing_emulator()
        if missing:
            print(
                f"error: no SQS endpoint is configured, and the local SQS emulator is not installed ({missing}).\n"
                "  install samseg[emulator]  (pip install 'samseg[emulator]'; scripts/install.sh does)\n"
                "  or set AWS_ENDPOINT_URL_SQS to an SQS endpoint, or pass --aws to use AWS SQS",
                file=sys.stderr,
            )
            return 1
        moto_port = free_port()
        overrides |= {
            "AWS_ENDPOINT_URL_SQS": f"http://127.0.0.1:{moto_port}",
            "AWS_ACCESS_KEY_ID": settings.aws_access_key_id or "samseg-local",
            "AWS_SECRET_ACCESS_KEY": settings.aws_secret_access_key or "samseg-local",
        }
    if not settings.api_tokens():
        # The API's job routes need a bearer token (401 without one): give this session its own.
        overrides["SAMSEG_API_TOKEN"] = secrets.token_urlsafe(32)
    if "SAMSEG_PUBLIC_BASE_URL" not in os.environ:
        shown_host = "localhost" if args.host in {"0.0.0.0", "127.0.0.1", "::"} else args.host
        overrides["SAMSEG_PUBLIC_BASE_URL"] = f"http://{shown_host}:{args.port}"
    device = settings.resolved_device()
    if (
        device == "cpu"
        and "SAMSEG_AMG_POINTS_PER_SIDE" not in os.environ
        and not _in_dotenv("SAMSEG_AMG_POINTS_PER_SIDE")
    ):
        # SAM-2's 32x32 grid costs ~30 s per image on 2 cores (2 minutes with upstream's generator);
        # 16x16 keeps a job around 10 s, which keeps a laptop demo interactive.
        overrides["SAMSEG_AMG_POINTS_PER_SIDE"] = str(CPU_DEFAULT_POINTS_PER_SIDE)
    env |= overrides
    os.environ |= overrides
    get_settings.cache_clear()
    settings = get_settings()

    if ensure_weights(settings) is None:
        return 1

    supervisor = Supervisor(env)
    stopping = False

    def request_stop(signum: int, _frame: Any) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGTERM, request_stop)
    try:
        if "AWS_ENDPOINT_URL_SQS" in overrides:
            endpoint = urlsplit(overrides["AWS_ENDPOINT_URL_SQS"])
            assert endpoint.port is not None
            supervisor.start("sqs", [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(endpoint.port)])
            if not wait_port("127.0.0.1", endpoint.port, 30):
                print("error: the local SQS endpoint (moto) did not start", file=sys.stderr)
                return 1
        from samseg.queue.sqs import JobQueues

        JobQueues(settings).ensure()
        celery = [sys.executable, "-m", "celery", "-A", "samseg"]
        # Two workers on one host cannot share a metrics port: each gets its own (printed in the banner).
        metrics_ports = {"worker-io": free_port(), "worker-segment": free_port()}
        if settings.metrics_port:
            metrics_ports = {"worker-io": settings.metrics_port, "worker-segment": settings.metrics_port + 1}
        metrics_env = {"SAMSEG_METRICS_HOST": "127.0.0.1"} if "SAMSEG_METRICS_HOST" not in os.environ else {}
        heartbeats = {"worker-io": "worker-io.heartbeat", "worker-segment": "worker-segment.heartbeat"}
        commands = up_worker_commands(settings.jobs_queue, settings.io_queue, settings.gpu_queue, celery)
        for name, command in commands.items():
            shown = "worker-gpu" if name == "worker-segment" and device.startswith("cuda") else name
            supervisor.start(
                shown,
                command.argv,
                SAMSEG_WORKER_HEARTBEAT_FILE=str(settings.state_dir / heartbeats[name]),
                SAMSEG_METRICS_PORT=str(metrics_ports[name]),
                **metrics_env,
                **command.env,
            )
        supervisor.start("beat", [*celery, "beat"])
        supervisor.start(
            "api",
            [sys.executable, "-m", "uvicorn", "samseg.api:app", "--host", args.host, "--port", str(args.port)],
        )
        _print_banner(settings, device, args, metrics_ports, generated_token="SAMSEG_API_TOKEN" in overrides)
        while not stopping:
            dead = supervisor.exited()
            if dead:
                print(f"error: {dead[0]} exited with status {dead[1]}; stopping", file=sys.stderr)
                return 1
            time.sleep(0.5)
        print("stopping…", file=sys.stderr)
        return 0
    finally:
        supervisor.stop()


def _missing_emulator() -> str | None:
    """Why `python -m moto.server` cannot run here (moto is the `emulator` extra, not a dependency), or None."""
    import importlib.util

    for module in ("moto", "flask"):  # moto.server needs moto's `server` extra, i.e. Flask
        try:
            found = importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            return f"no module named {module!r}"
    return None


def _in_dotenv(name: str) -> bool:
    path = Path(".env")
    return path.is_file() and any(line.split("=", 1)[0].strip() == name for line in path.read_text().splitlines())


def _print_banner(
    settings: Settings, device: str, args: argparse.Namespace, metrics_ports: dict[str, int], *, generated_token: bool
) -> None:
    api = settings.public_base_url
    n = settings.amg_points_per_side
    lines = [
        "",
        f"samseg is up: API {api}  (docs {api}/docs)",
        f"  SQS endpoint: {settings.aws_endpoint_url_sqs or 'AWS (' + settings.aws_region + ')'}"
        f"   jobs queue: {settings.jobs_queue}",
        f"  model: {settings.sam2_model} on {device}, {n}x{n} points, generator: {settings.amg_impl}",
        "  metrics: "
        + "  ".join(f"{name} http://127.0.0.1:{port}/metrics" for name, port in metrics_ports.items())
        + f"  api {api}/metrics",
    ]
    if device == "cpu":
        cores = os.cpu_count() or 1
        seconds = estimate_cpu_seconds(n, cores, settings.amg_impl)
        full = estimate_cpu_seconds(32, cores, settings.amg_impl)
        lines.append(
            f"  CPU only: expect roughly {seconds:.0f} s per image on {cores} cores (tiny model, {settings.amg_impl} "
            f"generator); SAM-2's default SAMSEG_AMG_POINTS_PER_SIDE=32 would take ~{full:.0f} s."
        )
    tokens = settings.api_tokens()
    token = tokens[0] if tokens else ""
    origin = "generated for this session" if generated_token else "from SAMSEG_API_TOKEN"
    auth = shlex.quote(f"Authorization: Bearer {token}")
    example = shlex.quote(json.dumps({"uuid": "demo-1", "image_url": "https://example.com/photo.jpg"}))
    lines += [
        f"  API token ({origin}): {token}",
        "  submit a job:",
        "    samseg submit --uuid demo-1 --image-url https://example.com/photo.jpg",
        f"    curl -X POST {api}/jobs -H {auth} -H 'Content-Type: application/json' -d {example}",
        f"  follow it:   curl -H {auth} {api}/jobs/demo-1",
        "  Ctrl-C stops everything.",
        "",
    ]
    print("\n".join(lines), flush=True)
