"""`samseg up`: the whole service on one machine (local SQS, an I/O worker, a segment worker, beat, the API).

It says "samseg is up" only once a job would be taken: both workers consume (their heartbeat files, written
from Celery's worker_ready), the segment worker's model is warm (its `.ready` marker, samseg.ops.health) and
the API answers /readyz. Its banner tells a client in another shell everything it needs: the SQS endpoint,
region and (fake) credentials, and the API token when `up` generated it (a token the user set is never
printed).
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shlex
import signal
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from samseg.cli.admin import ensure_weights
from samseg.cli.supervisor import Supervisor, free_port, port_taken, wait_port

if TYPE_CHECKING:
    from samseg.core.settings import Settings

# Measured on a 2-core x86_64 machine with sam2.1_hiera_tiny (docs/performance-cpu.md, item 8): ~2.7 s for the
# image encoder plus, per grid point, ~0.1 s in upstream's generator and ~0.008 s in samseg's.
CPU_ENCODER_SECONDS = 2.7
CPU_SECONDS_PER_POINT = {"upstream": 0.1, "fast": 0.008}
CPU_DEFAULT_POINTS_PER_SIDE = 16
# What `samseg up` gives its own SQS emulator when the user has no AWS keys set: moto accepts any, and boto3
# and kombu refuse to sign requests without some. Printed in the banner for clients in another shell.
LOCAL_CREDENTIALS = "samseg-local"
# How often `up` says what it still waits for while the workers warm up.
WAITING_NOTE_SECONDS = 15.0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    up = sub.add_parser("up", help="run SQS (moto, unless configured), a worker, beat and the API on this machine")
    up.add_argument("--host", default="127.0.0.1", help="API bind address (default 127.0.0.1)")
    up.add_argument("--port", type=int, default=8000, help="API port (default 8000)")
    up.add_argument("--aws", action="store_true", help="use real AWS SQS (credentials from the usual chain)")
    up.set_defaults(func=cmd_up)


def estimate_cpu_seconds(points_per_side: int, cores: int, impl: str) -> float:
    scale = 2 / max(1, cores)
    return (CPU_ENCODER_SECONDS + CPU_SECONDS_PER_POINT[impl] * points_per_side**2) * scale


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


def setting_origin(name: str, environ: Mapping[str, str], dotenv: Path = Path(".env")) -> str | None:
    """Where a setting the user gave comes from ("the environment" wins over ".env", as in Settings), or None."""
    if name in environ:
        return "the environment"
    if dotenv.is_file() and any(line.split("=", 1)[0].strip() == name for line in dotenv.read_text().splitlines()):
        return str(dotenv)
    return None


def cpu_points_override(device: str, environ: Mapping[str, str], dotenv: Path = Path(".env")) -> int | None:
    """The grid `up` uses on a CPU when the user set none: SAM-2's 32x32 costs ~30 s per image on 2 cores
    (2 minutes with upstream's generator); 16x16 keeps a job around 10 s, which keeps a laptop demo
    interactive. A value the user set (environment or .env) is theirs, and the banner says what it costs."""
    if device != "cpu" or setting_origin("SAMSEG_AMG_POINTS_PER_SIDE", environ, dotenv):
        return None
    return CPU_DEFAULT_POINTS_PER_SIDE


@dataclass(frozen=True)
class LocalSqs:
    """The SQS emulator `up` runs itself, and what a client elsewhere needs to reach the same queues."""

    port: int
    credentials: bool  # whether `up` made up the credentials (then the banner shows them; never real ones)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def cmd_up(args: argparse.Namespace, settings: Settings) -> int:
    from samseg.core.settings import get_settings

    env = dict(os.environ)
    overrides: dict[str, str] = {}
    local: LocalSqs | None = None
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
        port = settings.local_sqs_port or free_port()
        if settings.local_sqs_port and port_taken("127.0.0.1", port):
            print(
                f"error: port {port} of the local SQS emulator is taken (another `samseg up`? ElasticMQ?).\n"
                "  set SAMSEG_LOCAL_SQS_PORT to a free port, or to 0 to pick one at every start;\n"
                "  or, to use the SQS endpoint already there, set AWS_ENDPOINT_URL_SQS to it",
                file=sys.stderr,
            )
            return 1
        own_keys = not (settings.aws_access_key_id or settings.aws_secret_access_key)
        local = LocalSqs(port, credentials=own_keys)
        overrides |= {
            "AWS_ENDPOINT_URL_SQS": local.endpoint,
            "AWS_ACCESS_KEY_ID": settings.aws_access_key_id or LOCAL_CREDENTIALS,
            "AWS_SECRET_ACCESS_KEY": settings.aws_secret_access_key or LOCAL_CREDENTIALS,
        }
    if not settings.api_tokens():
        # The API's job routes need a bearer token (401 without one): give this session its own.
        overrides["SAMSEG_API_TOKEN"] = secrets.token_urlsafe(32)
    if "SAMSEG_PUBLIC_BASE_URL" not in os.environ:
        overrides["SAMSEG_PUBLIC_BASE_URL"] = f"http://{_shown_host(args.host)}:{args.port}"
    device = settings.resolved_device()
    points = cpu_points_override(device, os.environ)
    if points is not None:
        overrides["SAMSEG_AMG_POINTS_PER_SIDE"] = str(points)
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
        if local is not None:
            argv = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(local.port)]
            supervisor.start("sqs", argv, stop_last=True)
            if not wait_port("127.0.0.1", local.port, 30):
                print("error: the local SQS endpoint (moto) did not start", file=sys.stderr)
                return 1
        from samseg.ops.health import reset as reset_health
        from samseg.queue.sqs import JobQueues

        JobQueues(settings).ensure()
        celery = [sys.executable, "-m", "celery", "-A", "samseg"]
        # Two workers on one host cannot share a metrics port: each gets its own (printed in the banner).
        metrics_ports = {"worker-io": free_port(), "worker-segment": free_port()}
        if settings.metrics_port:
            metrics_ports = {"worker-io": settings.metrics_port, "worker-segment": settings.metrics_port + 1}
        metrics_env = {"SAMSEG_METRICS_HOST": "127.0.0.1"} if "SAMSEG_METRICS_HOST" not in os.environ else {}
        heartbeats = {name: settings.state_dir / f"{name}.heartbeat" for name in ("worker-io", "worker-segment")}
        needs_model = {"worker-io": False, "worker-segment": settings.preload_model}
        commands = up_worker_commands(settings.jobs_queue, settings.io_queue, settings.gpu_queue, celery)
        for name, command in commands.items():
            reset_health(heartbeats[name])  # a previous run's files must not make this one look ready
            shown = "worker-gpu" if name == "worker-segment" and device.startswith("cuda") else name
            worker_env = {
                "SAMSEG_WORKER_HEARTBEAT_FILE": str(heartbeats[name]),
                "SAMSEG_METRICS_PORT": str(metrics_ports[name]),
                **metrics_env,
                **command.env,
            }
            supervisor.start(shown, command.argv, worker_env)
        supervisor.start("beat", [*celery, "beat"])
        supervisor.start(
            "api",
            [sys.executable, "-m", "uvicorn", "samseg.api:app", "--host", args.host, "--port", str(args.port)],
        )
        print("waiting for the workers (the model warms up) and the API…", file=sys.stderr, flush=True)
        probe = ReadinessProbe(
            {name: (heartbeats[name], needs_model[name]) for name in commands},
            f"http://{_connect_host(args.host)}:{args.port}/readyz",
            settings.worker_heartbeat_interval_seconds,
        )
        dead = probe.wait(supervisor, lambda: stopping)
        if dead is None and not stopping:
            _print_banner(
                settings, device, args, metrics_ports, local=local, token_generated="SAMSEG_API_TOKEN" in overrides
            )
        while not stopping and dead is None:
            dead = supervisor.exited()
            time.sleep(0.5)
        if dead is not None:
            print(f"error: {dead[0]} exited with status {dead[1]}; stopping", file=sys.stderr)
            return 1
        print("stopping…", file=sys.stderr)
        return 0
    finally:
        supervisor.stop()


class ReadinessProbe:
    """Whether the stack would take a job now: each worker consumes (a fresh heartbeat, written once Celery's
    worker_ready fired), a worker that needs the model has warmed it (the `.ready` marker, written the moment
    warm-up ends, not at the next heartbeat), and the API's /readyz answers 200."""

    def __init__(self, workers: dict[str, tuple[Path, bool]], readyz_url: str, heartbeat_interval: float) -> None:
        self.workers = workers
        self.readyz_url = readyz_url
        self.heartbeat_interval = heartbeat_interval

    def pending(self) -> list[str]:
        """What is not ready yet, in words (empty: ready)."""
        from samseg.ops.health import ready_marker, worker_health

        waiting: list[str] = []
        for name, (heartbeat, needs_model) in self.workers.items():
            if not worker_health(heartbeat, self.heartbeat_interval).alive:
                waiting.append(f"{name} (starting)")
            elif needs_model and not ready_marker(heartbeat).exists():
                waiting.append(f"{name} (warming up the model)")
        if not _answers_200(self.readyz_url):
            waiting.append(f"api ({self.readyz_url})")
        return waiting

    def wait(self, supervisor: Supervisor, stopping: Callable[[], bool]) -> tuple[str, int] | None:
        """Until ready or a stop is requested; the child that exited meanwhile, if one did."""
        noted = time.monotonic()
        while not stopping():
            dead = supervisor.exited()
            if dead is not None:
                return dead
            waiting = self.pending()
            if not waiting:
                return None
            if time.monotonic() - noted >= WAITING_NOTE_SECONDS:
                print("still waiting for: " + ", ".join(waiting), file=sys.stderr, flush=True)
                noted = time.monotonic()
            time.sleep(0.2)
        return None


def _answers_200(url: str) -> bool:
    import urllib.request

    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback: never through a proxy
    try:
        with opener.open(url, timeout=2) as response:
            return int(response.status) == 200
    except OSError:  # refused, timed out, or an HTTPError (503 while a dependency is down)
        return False


def _shown_host(host: str) -> str:
    return "localhost" if host in {"0.0.0.0", "127.0.0.1", "::"} else host


def _connect_host(host: str) -> str:
    """Where `up` itself reaches the API it started (a wildcard bind is reachable on loopback)."""
    if host in {"0.0.0.0", ""}:
        return "127.0.0.1"
    if host == "::":
        return "[::1]"
    return f"[{host}]" if ":" in host else host


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


def _print_banner(
    settings: Settings,
    device: str,
    args: argparse.Namespace,
    metrics_ports: dict[str, int],
    *,
    local: LocalSqs | None,
    token_generated: bool,
) -> None:
    api = settings.public_base_url
    n = settings.amg_points_per_side
    if local is not None:
        sqs = f"{local.endpoint} (local moto, region {settings.aws_region})"
    elif settings.aws_endpoint_url_sqs:
        sqs = f"{settings.aws_endpoint_url_sqs} (AWS_ENDPOINT_URL_SQS, region {settings.aws_region})"
    else:
        sqs = f"AWS ({settings.aws_region})"
    lines = [
        "",
        f"samseg is up: API {api}  (docs {api}/docs)",
        f"  SQS endpoint: {sqs}   jobs queue: {settings.jobs_queue}",
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
        origin = setting_origin("SAMSEG_AMG_POINTS_PER_SIDE", os.environ)
        if origin is not None and n != CPU_DEFAULT_POINTS_PER_SIDE:
            lines.append(
                f"  SAMSEG_AMG_POINTS_PER_SIDE={n} is set in {origin}; without it `samseg up` uses "
                f"{CPU_DEFAULT_POINTS_PER_SIDE} on a CPU."
            )
    # The token is printed once, and only one this session made up; curl reads it from the shell.
    exports: list[str] = []
    if local is not None:
        exports.append(f"AWS_ENDPOINT_URL_SQS={local.endpoint} AWS_REGION={settings.aws_region}")
        if local.credentials:
            exports[-1] += f" AWS_ACCESS_KEY_ID={LOCAL_CREDENTIALS} AWS_SECRET_ACCESS_KEY={LOCAL_CREDENTIALS}"
    if token_generated:
        lines.append("  API token: generated for this session (set SAMSEG_API_TOKEN to choose your own)")
        exports.append(f"SAMSEG_API_TOKEN={settings.api_tokens()[0]}")
    else:
        origin = setting_origin("SAMSEG_API_TOKEN", os.environ) or "the environment"
        lines.append(f"  API token: using SAMSEG_API_TOKEN from {origin}")
    if exports:
        lines.append("  in another shell (samseg submit / status, curl, the aws CLI, boto3):")
        lines += [f"    export {line}" for line in exports]
    if local is not None and not local.credentials:
        lines.append("    (with your AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY: moto accepts any)")
    auth = '"Authorization: Bearer $SAMSEG_API_TOKEN"'
    example = shlex.quote(json.dumps({"uuid": "demo-1", "image_url": "https://example.com/photo.jpg"}))
    lines += [
        "  submit a job:",
        "    samseg submit --uuid demo-1 --image-url https://example.com/photo.jpg",
        f"    curl -X POST {api}/jobs -H {auth} -H 'Content-Type: application/json' -d {example}",
        f"  follow it:   curl -H {auth} {api}/jobs/demo-1",
        "  Ctrl-C stops everything.",
        "",
    ]
    print("\n".join(lines), flush=True)
