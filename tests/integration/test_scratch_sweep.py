"""Issue #15 (3e): scratch space swept at worker start — what a killed worker left is removed, what a live
process (or another host sharing the directory) is using is kept.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from unittest import mock

from samseg.core.settings import Settings
from samseg.ops.scratch import scratch_prefix, sweep_scratch
from tests.faults_support import count_events


def _settings(assets: Path) -> Settings:
    with mock.patch.dict("os.environ", {"SAMSEG_ASSETS_DIR": str(assets)}, clear=True):
        return Settings(stale_run_seconds=3600)


def _folder(root: Path, name: str, age: float = 0) -> Path:
    folder = root / name
    folder.mkdir(parents=True)
    (folder / "image.png").write_bytes(b"x" * 100)
    if age:
        then = time.time() - age
        for path in (folder / "image.png", folder):
            os.utime(path, (then, then))
    return folder


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_sweep_removes_a_dead_owners_and_stale_folders_and_keeps_the_rest(tmp_path):
    settings = _settings(tmp_path / "assets")
    root = settings.scratch_dir
    host = scratch_prefix().split(".")[0]
    dead = _folder(root, f"{host}.{_dead_pid()}.tmpabc")  # young, but its process is gone
    mine = _folder(root, f"{scratch_prefix()}tmpdef")  # this process: alive
    other_host = _folder(root, f"otherhost.{_dead_pid()}.tmpghi")  # a PID of another host means nothing here
    stale = _folder(root, "tmpjkl", age=7200)  # untagged, untouched for longer than a stage may run
    young = _folder(root, "tmpmno")  # untagged and young: may be another worker's
    assert sweep_scratch(settings) == 2
    assert not dead.exists() and not stale.exists()
    assert mine.exists() and other_host.exists() and young.exists()
    assert sweep_scratch(settings, now=time.time() + 7200) == 3  # everything is stale two hours on


def test_a_worker_start_sweeps_what_a_killed_worker_left(make_stack):
    stack = make_stack()
    scratch = stack.assets / ".samseg" / "scratch"
    host = scratch_prefix().split(".")[0]
    left = _folder(scratch, f"{host}.{_dead_pid()}.tmpkilled")
    young = _folder(scratch, "tmpyoung")
    worker = stack.start_worker("-c", "1")
    assert not left.exists() and young.exists()
    assert count_events(worker, "scratch_removed") == 1
