"""Scratch space (Settings.scratch_dir) swept at worker start: what a killed worker left there.

A stage's temporary folder (samseg.worker.base StageTask.scratch) is removed when the stage ends, but not
when its process is killed (OOM killer, SIGKILL, a crash): those folders — a downloaded image, packed masks —
stay until something removes them. At worker start, `sweep_scratch` removes a folder when

- its name carries the tag of a process on this host (`scratch_prefix()`: `<host>.<pid>.`) that no longer
  runs: its owner is gone for certain, however young the folder; or
- nothing in it was modified for SAMSEG_STALE_RUN_SECONDS (longer than any stage may run), whoever made it.

Folders of live processes, and young folders of other hosts or containers sharing the directory (their PIDs
mean nothing here), are left alone, so several workers may share one scratch directory.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import time
from pathlib import Path

import structlog

from samseg.core.settings import Settings
from samseg.ops.health import pid_alive

log = structlog.get_logger(__name__)

_TAG = re.compile(r"^(?P<host>[A-Za-z0-9_-]{1,64})\.(?P<pid>\d{1,10})\.")


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9_-]", "_", socket.gethostname())[:64] or "host"


def scratch_prefix() -> str:
    """The prefix a stage's temporary folder should carry: `tempfile.TemporaryDirectory(prefix=...)`."""
    return f"{_host()}.{os.getpid()}."


def sweep_scratch(settings: Settings, now: float | None = None) -> int:
    """Remove stale entries of the scratch directory (see the module docstring); returns how many."""
    root = settings.scratch_dir
    if not root.is_dir():
        return 0
    now = time.time() if now is None else now
    host = _host()
    removed = 0
    try:
        entries = sorted(root.iterdir())
    except OSError as exc:
        log.warning("scratch_not_swept", error=repr(exc))
        return 0
    for entry in entries:
        try:
            tag = _TAG.match(entry.name)
            owner_gone = tag is not None and tag["host"] == host and not pid_alive(int(tag["pid"]))
            if owner_gone or now - _newest(entry) > settings.stale_run_seconds:
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry)
                else:
                    entry.unlink()
                removed += 1
                log.info("scratch_removed", entry=entry.name, reason="owner gone" if owner_gone else "stale")
        except FileNotFoundError:
            continue  # its owner removed it meanwhile
        except OSError as exc:
            log.warning("scratch_not_removed", entry=entry.name, error=repr(exc))
    return removed


def _newest(entry: Path) -> float:
    newest = entry.lstat().st_mtime
    if entry.is_dir() and not entry.is_symlink():
        for folder, dirs, files in os.walk(entry):
            for name in (*dirs, *files):
                try:
                    newest = max(newest, (Path(folder) / name).lstat().st_mtime)
                except FileNotFoundError:
                    continue
    return newest
