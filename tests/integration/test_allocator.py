"""samseg.runtime.allocator: the mallopt thresholds hold in the process that sets them (issue #18)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from samseg.runtime.allocator import tune_allocator

ROOT = Path(__file__).resolve().parents[2]

# Two 16 MB blocks and an 8 MB one, freed together: above glibc's default (dynamic) thresholds the heap top is
# trimmed back to the kernel and faulted in again on every round, as SAM-2's per-chunk activations were.
PROBE = """
import resource, sys
import numpy as np
if sys.argv[1] == "on":
    from samseg.runtime.allocator import tune_allocator
    assert tune_allocator()

def once():
    a, b, c = np.ones(2_000_000), np.ones(2_000_000), np.ones(1_000_000)
    del a, b, c

once()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):
    once()
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 20)
"""


def _faults_per_round(mode: str) -> float:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    env["PYTHONPATH"] = str(ROOT)
    out = subprocess.run(
        [sys.executable, "-c", PROBE, mode], env=env, capture_output=True, text=True, check=True, timeout=60
    )
    return float(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt")
def test_thresholds_stop_the_fault_storm() -> None:
    untuned, tuned = _faults_per_round("off"), _faults_per_round("on")
    assert untuned > 1000  # thousands of 4 KiB pages returned to the kernel and faulted in again per round
    assert tuned < 50


def test_disabled_is_a_no_op() -> None:
    assert tune_allocator(False) is False


def test_environment_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    from samseg.runtime import allocator

    monkeypatch.setattr(allocator, "_applied", {})
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "33554432")
    assert tune_allocator() is False
