"""Liveness and readiness: the worker's heartbeat file and the API's dependency checks.

A worker's main process writes a small JSON heartbeat every SAMSEG_WORKER_HEARTBEAT_INTERVAL_SECONDS from
its own thread (so a long task in a solo pool does not make it look dead). A worker that consumes the GPU
queue is *ready* only once a process of it has loaded the model and run a warm-up inference; that process
drops a `.ready` marker next to the heartbeat. `samseg healthcheck worker` reads both (Docker HEALTHCHECK).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog

from samseg.core.settings import Settings

if TYPE_CHECKING:
    from samseg.stores import Stores

log = structlog.get_logger(__name__)


def ready_marker(heartbeat: Path) -> Path:
    return heartbeat.with_name(heartbeat.name + ".ready")


def reset(heartbeat: Path) -> None:
    """Forget a previous run's files, so a restarted worker is not ready before it warmed up again."""
    for path in (heartbeat, ready_marker(heartbeat)):
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def mark_ready(heartbeat: Path, **details: Any) -> None:
    _write_json(ready_marker(heartbeat), {"pid": os.getpid(), "time": time.time(), **details})


class Heartbeat(threading.Thread):
    def __init__(
        self,
        path: Path,
        interval: float,
        hostname: str,
        needs_model: bool,
        problems: Callable[[], list[str]] | None = None,
    ) -> None:
        super().__init__(name="samseg-heartbeat", daemon=True)
        self.path = path
        self.interval = interval
        self.hostname = hostname
        self.needs_model = needs_model
        # What makes a live process unhealthy anyway (samseg.ops.watchdog: a task stuck past its hard limit).
        self.problems = problems or (lambda: [])
        self._stop_event = threading.Event()

    def beat(self) -> None:
        ready = not self.needs_model or ready_marker(self.path).exists()
        data: dict[str, Any] = {"pid": os.getpid(), "hostname": self.hostname, "time": time.time(), "ready": ready}
        problems = self.problems()
        if problems:
            data["problems"] = problems
        _write_json(self.path, data)

    def run(self) -> None:
        announced = False
        while True:
            try:
                self.beat()
                if not announced and (not self.needs_model or ready_marker(self.path).exists()):
                    log.info("worker_accepting_jobs", hostname=self.hostname, model_warm=self.needs_model)
                    announced = True
            except OSError as exc:
                log.warning("heartbeat_write_failed", error=repr(exc))
            if self._stop_event.wait(self.interval):
                return

    def stop(self) -> None:
        self._stop_event.set()


@dataclass(frozen=True)
class WorkerHealth:
    alive: bool
    ready: bool
    reason: str


def worker_health(path: Path, interval: float, now: float | None = None) -> WorkerHealth:
    now = time.time() if now is None else now
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return WorkerHealth(False, False, f"no heartbeat at {path} (worker not started yet?)")
    except (OSError, ValueError) as exc:
        return WorkerHealth(False, False, f"unreadable heartbeat {path}: {exc}")
    age = now - float(data.get("time", 0))
    if age > 3 * interval + 5:
        return WorkerHealth(False, False, f"heartbeat is {age:.0f}s old (interval {interval:.0f}s)")
    if not pid_alive(int(data.get("pid", 0))):
        return WorkerHealth(False, False, f"worker pid {data.get('pid')} is gone")
    if data.get("problems"):
        return WorkerHealth(False, False, "unhealthy: " + "; ".join(str(p) for p in data["problems"]))
    if not data.get("ready"):
        return WorkerHealth(True, False, "alive, model still loading / warming up")
    return WorkerHealth(True, True, f"alive and ready ({data.get('hostname')})")


def pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(3)}")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)


# --- API readiness -----------------------------------------------------------------------------------------
Check = Callable[[], str]


def readiness(settings: Settings, broker_check: Check, stores: Stores) -> tuple[bool, dict[str, dict[str, Any]]]:
    """Run every check; each reports ok + detail, so an operator sees all that is wrong at once."""
    checks: dict[str, Check] = {
        "broker": broker_check,
        "blob_store": stores.blobs.check,
        "job_store": stores.jobs.backend.describe,
    }
    if not settings.storage_url:  # the assets live on this host's disk
        checks["disk_free"] = lambda: _check_disk(settings.assets_dir, settings.min_free_disk_bytes)
    results: dict[str, dict[str, Any]] = {}
    for name, check in checks.items():
        try:
            results[name] = {"ok": True, "detail": check()}
        except Exception as exc:
            results[name] = {"ok": False, "detail": f"{type(exc).__name__}: {exc}"}
    return all(r["ok"] for r in results.values()), results


def public_checks(checks: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """What /readyz shows a caller without the API token: each check's verdict, none of its detail."""
    return {name: {"ok": bool(result.get("ok"))} for name, result in checks.items()}


def _check_disk(folder: Path, minimum: int) -> str:
    free = shutil.disk_usage(folder).free
    if free < minimum:
        raise RuntimeError(f"{free} bytes free under {folder}, below SAMSEG_MIN_FREE_DISK_BYTES={minimum}")
    return f"{free} bytes free"
