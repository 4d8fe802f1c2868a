"""Prometheus metrics without a shared volume: every process tree keeps its samples on its own host.

Celery prefork children are separate processes, so the counters use prometheus_client's multiprocess mode.
Its files are named `{type}_{pid}.db`, and containers have their own PID namespaces, so one directory
shared between hosts or containers would mix equal PIDs of different processes (issue 8). Instead:

- A *process tree* is a worker's main process with its pool children, or one API process. The first samseg
  process of a tree to call `setup` (its root: the entry points do, before any fork) makes a directory of its own,
  `{SAMSEG_METRICS_DIR}/{pid namespace}/{root pid}` (by default under the system temp dir, never the assets
  volume), empties it, and points PROMETHEUS_MULTIPROC_DIR at it; children forked from the root inherit it.
  The root also removes directories of dead roots *in its own PID namespace* (their PIDs can be checked);
  it never touches a live tree's directory, so a worker and the API on one host never wipe each other.
- Each worker's main process serves its tree's samples on `SAMSEG_METRICS_PORT` (`serve`); the API serves
  its own tree plus queue depth (read by a background thread, `QueueDepthPoller`) and free disk. Prometheus
  scrapes every worker and the API (config/prometheus.yml) and sums across targets.

prometheus_client reads PROMETHEUS_MULTIPROC_DIR when it is first imported, and the `celery` command has
usually imported it already (Flower's CLI plugin does), so `setup` sets the variable and then makes
prometheus_client choose its value class again; the instruments (`instruments()`) are created after that, on
first use, so they are multiprocess ones. Importing this module does nothing.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
    start_http_server,
    values,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from samseg.core.settings import Settings, get_settings
from samseg.ops.health import pid_alive

log = structlog.get_logger(__name__)

_ROOT_ENV = "SAMSEG_METRICS_ROOT_PID"  # which process owns PROMETHEUS_MULTIPROC_DIR (set by the root)


def pid_namespace() -> str:
    """This process's PID namespace id (`/proc/self/ns/pid`); PIDs are only comparable within one."""
    try:
        link = os.readlink("/proc/self/ns/pid")  # "pid:[4026531836]"
    except OSError:
        return "host"
    return link.partition("[")[2].rstrip("]") or "host"


def base_dir(settings: Settings) -> Path:
    configured = settings.metrics_dir
    return configured if configured is not None else Path(tempfile.gettempdir()) / "samseg-metrics"


def _claim_tree_dir(settings: Settings) -> Path:
    """This tree's samples directory: inherited from the root, or made (empty) if this process is the root."""
    inherited = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    root = os.environ.get(_ROOT_ENV, "")
    if inherited and root.isdigit() and int(root) in {os.getpid(), os.getppid()}:
        return Path(inherited)
    pid = os.getpid()
    namespace_dir = base_dir(settings) / pid_namespace()
    mine = namespace_dir / str(pid)
    namespace_dir.mkdir(parents=True, exist_ok=True)
    for entry in namespace_dir.iterdir():
        # A dead root's directory (a restarted worker, a CLI process): same namespace, so its PID is meaningful.
        if entry.name.isdigit() and (entry == mine or not pid_alive(int(entry.name))):
            shutil.rmtree(entry, ignore_errors=True)
    mine.mkdir()
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(mine)
    os.environ[_ROOT_ENV] = str(pid)
    atexit.register(_remove_tree_dir, mine, pid)
    return mine


def _remove_tree_dir(path: Path, root_pid: int) -> None:
    if os.getpid() == root_pid:  # forked children inherit atexit handlers; only the root removes
        shutil.rmtree(path, ignore_errors=True)


STAGES = ("download", "segment", "persist", "notify")

_lock = threading.Lock()
_tree_dir: Path | None = None
_instruments: Instruments | None = None


def setup(settings: Settings | None = None) -> Path:
    """Claim this process tree's samples directory (once per process) and switch prometheus_client to it.

    Entry points call it first thing (worker start before the pool forks, the API's create_app); anything that
    records a sample before that gets it here, with the process's Settings.
    """
    global _tree_dir
    with _lock:
        if _tree_dir is None:
            _tree_dir = _claim_tree_dir(settings or get_settings())
            values.ValueClass = values.get_value_class()  # type: ignore[no-untyped-call]
        return _tree_dir


@dataclass(frozen=True)
class Instruments:
    """samseg's own metrics, created once per process after `setup` (so they are multiprocess ones)."""

    jobs: Counter
    stage_seconds: Histogram
    masks_per_job: Histogram
    callbacks: Counter
    # The scaling signal's wait in SQS (samseg.ops.scaling_signal): recorded by workers when a message arrives.
    queue_wait: Histogram
    queue_last_wait: Gauge


def instruments() -> Instruments:
    global _instruments
    setup()
    with _lock:
        if _instruments is None:
            _instruments = Instruments(
                jobs=Counter("samseg_jobs_total", "Jobs finished, by outcome", ["outcome"]),
                stage_seconds=Histogram(
                    "samseg_stage_duration_seconds",
                    "Time spent in each stage of a job",
                    ["stage"],
                    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800),
                ),
                masks_per_job=Histogram(
                    "samseg_masks_per_job",
                    "Masks written per completed job",
                    buckets=(0, 1, 5, 10, 25, 50, 100, 200, 500, 1000, 3000),
                ),
                callbacks=Counter("samseg_callbacks_total", "Callbacks to the app server, by final result", ["result"]),
                queue_wait=Histogram(
                    "samseg_queue_wait_seconds",
                    "Seconds a task message waited in SQS before a worker received it (SentTimestamp to receipt)",
                    ["queue"],
                    buckets=(0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600),
                ),
                queue_last_wait=Gauge(
                    "samseg_queue_last_wait_seconds",
                    "Wait in SQS of the last task message this worker received: the oldest job's age when it was taken",
                    ["queue"],
                    multiprocess_mode="mostrecent",
                ),
            )
        return _instruments


def tree_registry(*extra: Collector) -> CollectorRegistry:
    """A registry of this process tree's samples (every process of it) plus `extra` collectors."""
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, path=str(setup()))  # type: ignore[no-untyped-call]
    for collector in extra:
        registry.register(collector)
    return registry


def render(*extra: Collector) -> bytes:
    return generate_latest(tree_registry(*extra))


def process_exited(pid: int) -> None:
    multiprocess.mark_process_dead(pid, path=str(setup()))  # type: ignore[no-untyped-call]


# --- a worker's own /metrics -----------------------------------------------------------------------------
@dataclass
class MetricsServer:
    port: int
    _server: Any
    _thread: threading.Thread

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def serve(port: int, host: str) -> MetricsServer | None:
    """Serve this tree's samples on http://host:port/metrics from a daemon thread of the calling process.

    Called by the worker's main process (which sees its pool children's files). A port already in use is
    logged and the worker goes on without metrics: losing a scrape target must not stop job processing.
    """
    try:
        server, thread = start_http_server(port, addr=host, registry=tree_registry())
    except OSError as exc:
        log.error("metrics_server_failed", port=port, host=host, error=repr(exc))
        return None
    bound = int(server.server_address[1])
    log.info("metrics_serving", url=f"http://{host}:{bound}/metrics", samples_dir=str(setup()))
    return MetricsServer(bound, server, thread)


# --- the API's extra samples -------------------------------------------------------------------------------
class QueueDepthPoller(Collector):
    """Reads queue depths every `interval` seconds in a background thread, never on a scrape's thread.

    Started on first use (so importing the API starts no thread). A scrape reports the last successful read
    while it is recent (3 intervals); while SQS is unreachable the depth samples disappear and
    `samseg_queue_depth_age_seconds` keeps growing, which is what an alert should watch.
    """

    def __init__(self, read: Callable[[], dict[str, int]], interval: float) -> None:
        self.read = read
        self.interval = interval
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._first = threading.Event()
        self._stop_event = threading.Event()
        self._last: tuple[float, dict[str, int]] | None = None
        self._failing = False

    def ensure_started(self, first_wait: float = 1.0) -> None:
        """Start the thread once; the very first caller waits up to `first_wait` s for the first read."""
        with self._lock:
            started = self._thread is not None
            if not started:
                self._thread = threading.Thread(target=self._run, name="samseg-queue-depth", daemon=True)
                self._thread.start()
        if not started:
            self._first.wait(first_wait)

    def stop(self) -> None:
        self._stop_event.set()

    def latest(self) -> tuple[float, dict[str, int]] | None:
        """(age in seconds, depths) of the last successful read, or None if there was none yet."""
        last = self._last
        return None if last is None else (time.monotonic() - last[0], last[1])

    def poll_once(self) -> None:
        try:
            depths = self.read()
        except Exception as exc:  # SQS unreachable: keep the old values, let them age
            if not self._failing:
                log.warning("queue_depth_unavailable", error=repr(exc))
            self._failing = True
        else:
            self._last = (time.monotonic(), depths)
            if self._failing:
                log.info("queue_depth_available")
            self._failing = False
        finally:
            self._first.set()

    def _run(self) -> None:
        while not self._stop_event.is_set():
            self.poll_once()
            self._stop_event.wait(self.interval)

    def collect(self) -> Iterator[Metric]:
        depth = GaugeMetricFamily(
            "samseg_queue_depth", "ApproximateNumberOfMessages of samseg's queues", labels=["queue"]
        )
        latest = self.latest()
        if latest is not None and latest[0] <= 3 * self.interval:
            for name, value in latest[1].items():
                depth.add_metric([name], value)
        yield depth
        if latest is not None:
            age = GaugeMetricFamily("samseg_queue_depth_age_seconds", "Seconds since queue depth was last read")
            age.add_metric([], round(latest[0], 3))
            yield age


class DiskCollector(Collector):
    """Free bytes on the assets filesystem: one statvfs per scrape (no walk of the tree)."""

    def __init__(self, assets_dir: Path) -> None:
        self.assets_dir = assets_dir

    def collect(self) -> Iterator[Metric]:
        free = GaugeMetricFamily("samseg_assets_free_bytes", "Free bytes on the assets filesystem")
        with contextlib.suppress(OSError):
            free.add_metric([], shutil.disk_usage(self.assets_dir).free)
        yield free
