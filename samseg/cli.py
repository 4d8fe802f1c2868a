"""The `samseg` command: run the local stack, submit jobs, segment one image, manage weights and queues."""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shlex
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from samseg.core.settings import Settings, get_settings


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="samseg", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    up = sub.add_parser("up", help="run SQS (moto, unless configured), a worker, beat and the API on this machine")
    up.add_argument("--host", default="127.0.0.1", help="API bind address (default 127.0.0.1)")
    up.add_argument("--port", type=int, default=8000, help="API port (default 8000)")
    up.add_argument("--aws", action="store_true", help="use real AWS SQS (credentials from the usual chain)")
    up.set_defaults(func=cmd_up)

    submit = sub.add_parser("submit", help="put a job on the jobs queue, as the app server would")
    submit.add_argument("--uuid", required=True)
    submit.add_argument("--image-url", required=True)
    submit.set_defaults(func=cmd_submit)

    segment = sub.add_parser("segment", help="segment one image (file or URL) without a queue")
    segment.add_argument("image", help="path or http(s) URL of the image")
    segment.add_argument("--out", required=True, type=Path, help="folder for mask_images/ and result.json")
    segment.add_argument("--uuid", default="local", help="job id written into result.json (default: local)")
    segment.set_defaults(func=cmd_segment)

    weights = sub.add_parser("weights", help="SAM-2 checkpoints")
    wsub = weights.add_subparsers(dest="weights_command", required=True)
    wdl = wsub.add_parser("download", help="download a checkpoint from Meta (SHA-256 verified)")
    wdl.add_argument("model", nargs="?", help="model name (default: SAMSEG_SAM2_MODEL)")
    wdl.add_argument("--dest", type=Path, help="where to write it (default: SAMSEG_SAM2_CHECKPOINT)")
    wdl.set_defaults(func=cmd_weights_download)
    wens = wsub.add_parser("ensure", help="download the configured checkpoint if it is missing (file-locked)")
    wens.set_defaults(func=cmd_weights_ensure)

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

    health = sub.add_parser("healthcheck", help="exit 0 if healthy (for Docker HEALTHCHECK)")
    hsub = health.add_subparsers(dest="health_command", required=True)
    hworker = hsub.add_parser("worker", help="this container's worker: heartbeat fresh and model warm")
    hworker.add_argument("--live", action="store_true", help="liveness only: do not require the model to be ready")
    hworker.set_defaults(func=cmd_healthcheck_worker)

    status = sub.add_parser("status", help="print a job's status as JSON")
    status.add_argument("uuid")
    status.set_defaults(func=cmd_status)

    args = parser.parse_args(argv)
    settings = get_settings()
    from samseg.core.logs import configure_logging

    configure_logging(settings.log_level, settings.log_json)
    result: int = args.func(args, settings)
    return result


# --- submit / status / queues ------------------------------------------------------------------------------
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


def cmd_queues_sweep_events(args: argparse.Namespace, settings: Settings) -> int:
    from samseg.queue.events import sweep_event_queues
    from samseg.worker.app import get_app

    for name in sweep_event_queues(get_app(), settings, min_backlog=args.min_backlog):
        print(f"deleted {name}")
    return 0


def cmd_healthcheck_worker(args: argparse.Namespace, settings: Settings) -> int:
    from samseg.ops.health import worker_health

    health = worker_health(settings.worker_heartbeat_file, settings.worker_heartbeat_interval_seconds)
    print(health.reason)
    return 0 if health.alive and (health.ready or args.live) else 1


def cmd_queues_ensure(args: argparse.Namespace, settings: Settings) -> int:
    from samseg.queue.sqs import JobQueues

    for name, url in JobQueues(settings).ensure().items():
        print(f"{name}\t{url}")
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


# --- segment -------------------------------------------------------------------------------------------------
def cmd_segment(args: argparse.Namespace, settings: Settings) -> int:
    import tempfile

    from samseg.core.contracts import CallbackBody, JobMessage
    from samseg.core.errors import JobError
    from samseg.core.masks import PackedMasks, write_packed_masks
    from samseg.runtime.segmenter import Segmenter
    from samseg.stores.results import describe_segments, write_job_folder
    from samseg.transfer.image_fetch import download_image, load_rgb

    JobMessage(uuid=args.uuid, image_url="x")  # validates the id used in result.json
    out: Path = args.out
    try:
        with tempfile.TemporaryDirectory() as tmp:
            source = Path(args.image)
            if urlsplit(args.image).scheme in {"http", "https"}:
                source = Path(tmp) / "source"
                download_image(args.image, source, settings)
            elif not source.is_file():
                raise JobError("image_not_found", f"{source} is not a file")
            image = load_rgb(source, settings)
            result = Segmenter(settings).segment(image)
            height, width = image.shape[:2]
            write_packed_masks(Path(tmp) / "masks.npy", result.masks, len(result.masks), height, width)
            masks = PackedMasks(Path(tmp) / "masks.npy", width)
            folder = out.resolve()
            segments = describe_segments(
                masks,
                result.predicted_iou.tolist(),
                result.stability_score.tolist(),
                lambda i: (folder / "mask_images" / f"mask_{i:03d}.png").as_uri(),
            )
            body = CallbackBody(
                uuid=args.uuid, status="completed", segments=segments, image_width=width, image_height=height
            )
            write_job_folder(folder, masks, body)
    except JobError as exc:
        print(f"error: {exc.code}: {exc.message}", file=sys.stderr)
        return 1
    print(f"{len(segments)} masks in {result.seconds:.1f} s → {folder}")
    return 0


# --- up ------------------------------------------------------------------------------------------------------
# Measured on a 2-core x86_64 machine with sam2.1_hiera_tiny (docs/performance.md): ~3 s for the image
# encoder plus, per grid point, ~0.1 s in upstream's generator and ~0.03 s in samseg's.
CPU_ENCODER_SECONDS = 3.0
CPU_SECONDS_PER_POINT = {"upstream": 0.1, "fast": 0.03}
CPU_DEFAULT_POINTS_PER_SIDE = 16


def estimate_cpu_seconds(points_per_side: int, cores: int, impl: str) -> float:
    scale = 2 / max(1, cores)
    return (CPU_ENCODER_SECONDS + CPU_SECONDS_PER_POINT[impl] * points_per_side**2) * scale


def _free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _wait_port(host: str, port: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=1):
                return True
        except OSError:
            time.sleep(0.2)
    return False


class Supervisor:
    """Starts children in their own process groups and stops them all, in reverse order, on exit."""

    def __init__(self, env: dict[str, str]) -> None:
        self.env = env
        self.children: list[tuple[str, subprocess.Popen[bytes]]] = []

    def start(self, name: str, argv: list[str], **env: str) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(argv, env={**self.env, **env}, start_new_session=True)
        self.children.append((name, proc))
        print(f"started {name} (pid {proc.pid})", flush=True)
        return proc

    def exited(self) -> tuple[str, int] | None:
        for name, proc in self.children:
            code = proc.poll()
            if code is not None:
                return name, code
        return None

    def stop(self, timeout: float = 30) -> None:
        for _, proc in reversed(self.children):
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for _, proc in reversed(self.children):
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


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
        moto_port = _free_port()
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
            if not _wait_port("127.0.0.1", endpoint.port, 30):
                print("error: the local SQS endpoint (moto) did not start", file=sys.stderr)
                return 1
        from samseg.queue.sqs import JobQueues

        JobQueues(settings).ensure()
        celery = [sys.executable, "-m", "celery", "-A", "samseg"]
        # Two workers on one host cannot share a metrics port: each gets its own (printed in the banner).
        metrics_ports = {"worker-io": _free_port(), "worker-segment": _free_port()}
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


if __name__ == "__main__":
    raise SystemExit(main())
