"""The unit tier's guard (tests/unit/conftest.py) refuses every way of starting a process, and says so."""

from __future__ import annotations

import multiprocessing
import os
import subprocess
import sys

import pytest

from tests.unit import conftest


def test_every_way_of_starting_a_process_is_refused_and_recorded() -> None:
    before = len(conftest.ATTEMPTS)
    with pytest.raises(RuntimeError, match=r"subprocess\.Popen is refused"):
        subprocess.run([sys.executable, "-c", "pass"], check=False)
    with pytest.raises(RuntimeError, match="multiprocessing start is refused"):
        multiprocessing.get_context("spawn").Process(target=print).start()
    with pytest.raises(RuntimeError, match=r"os\.fork is refused"):
        os.fork()
    with pytest.raises(RuntimeError, match=r"os\.system is refused"):
        os.system("true")
    tried = conftest.ATTEMPTS[before:]
    assert [t.split()[0] for t in tried] == ["subprocess.Popen", "multiprocessing", "os.fork", "os.system"]
    del conftest.ATTEMPTS[before:]  # expected here: not a failure of this test
