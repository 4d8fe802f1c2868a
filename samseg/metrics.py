"""Prometheus metrics, correct across every worker process.

Celery prefork children, several workers and the API are separate processes, so the counters use
prometheus_client's multiprocess mode: each process writes its samples to files under
`$SAMSEG_ASSETS_DIR/.samseg/metrics/` (the shared volume), and the API's `/metrics` sums them. Values that
are a property of the outside world (queue depth, disk usage) are read by the API at scrape time.

prometheus_client reads PROMETHEUS_MULTIPROC_DIR when it is first imported, and the `celery` command has
usually imported it already (Flower's CLI plugin does), so this module sets the variable and then makes
prometheus_client choose its value class again; metrics created afterwards are multiprocess ones.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from samseg.settings import get_settings

_dir = get_settings().state_dir / "metrics"
_dir.mkdir(parents=True, exist_ok=True)
os.environ.setdefault("PROMETHEUS_MULTIPROC_DIR", str(_dir.resolve()))

from prometheus_client import (  # noqa: E402  (after the environment variable above)
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
    multiprocess,
    values,
)
from prometheus_client.core import GaugeMetricFamily, Metric  # noqa: E402
from prometheus_client.registry import Collector  # noqa: E402

values.ValueClass = values.get_value_class()  # type: ignore[no-untyped-call]

STAGES = ("download", "segment", "persist", "notify")

JOBS = Counter("samseg_jobs_total", "Jobs finished, by outcome", ["outcome"])
STAGE_SECONDS = Histogram(
    "samseg_stage_duration_seconds",
    "Time spent in each stage of a job",
    ["stage"],
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800),
)
MASKS_PER_JOB = Histogram(
    "samseg_masks_per_job",
    "Masks written per completed job",
    buckets=(0, 1, 5, 10, 25, 50, 100, 200, 500, 1000, 3000),
)
CALLBACKS = Counter("samseg_callbacks_total", "Callbacks to the app server, by final result", ["result"])


class ScrapeTimeCollector(Collector):
    """Queue depth and disk usage, read when Prometheus scrapes (cached briefly: walking a big tree is slow)."""

    def __init__(self, assets_dir: Path, queue_depth: Callable[[], dict[str, int]], cache_seconds: float = 30) -> None:
        self.assets_dir = assets_dir
        self.queue_depth = queue_depth
        self.cache_seconds = cache_seconds
        self._usage: tuple[float, int] | None = None

    def collect(self) -> Iterator[Metric]:
        depth = GaugeMetricFamily(
            "samseg_queue_depth", "ApproximateNumberOfMessages of samseg's queues", labels=["queue"]
        )
        try:
            for name, value in self.queue_depth().items():
                depth.add_metric([name], value)
        except Exception:
            pass  # SQS unreachable: no sample rather than a failed scrape (readyz reports the broker)
        yield depth
        used = GaugeMetricFamily("samseg_assets_bytes", "Bytes of files under SAMSEG_ASSETS_DIR")
        used.add_metric([], self._assets_bytes())
        yield used
        free = GaugeMetricFamily("samseg_assets_free_bytes", "Free bytes on the assets filesystem")
        free.add_metric([], shutil.disk_usage(self.assets_dir).free if self.assets_dir.exists() else 0)
        yield free

    def _assets_bytes(self) -> int:
        now = time.monotonic()
        if self._usage and now - self._usage[0] < self.cache_seconds:
            return self._usage[1]
        total = 0
        for root, _dirs, files in os.walk(self.assets_dir):
            for name in files:
                try:
                    total += os.lstat(os.path.join(root, name)).st_size
                except OSError:
                    continue
        self._usage = (now, total)
        return total


def render(extra: Collector | None = None) -> bytes:
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
    if extra is not None:
        registry.register(extra)
    return generate_latest(registry)


def process_exited(pid: int) -> None:
    multiprocess.mark_process_dead(pid)  # type: ignore[no-untyped-call]
