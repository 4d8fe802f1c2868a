"""The unit tier runs in the pytest process: no child process, no moto, no worker (those are tests/integration
and tests/system). Enforced, not just agreed: while a unit test or a fixture of this package runs, starting a
process — subprocess (and everything built on it), os.fork/posix_spawn/system, multiprocessing — raises, and
the test that tried fails even if the code under test swallowed the error.
"""

from __future__ import annotations

import multiprocessing.process
import os
import subprocess
from collections.abc import Callable, Iterator
from typing import Any

import pytest

ATTEMPTS: list[str] = []  # what tried to start a process, in order; each test checks its own share


def _refusing(what: str) -> Callable[..., Any]:
    def refuse(*args: Any, **kwargs: Any) -> Any:
        ATTEMPTS.append(f"{what} {args[1:3]!r}" if what == "subprocess.Popen" else what)
        raise RuntimeError(f"unit tests run in one process: {what} is refused here (tests/integration may start one)")

    return refuse


@pytest.fixture(scope="package", autouse=True)
def _in_process_only() -> Iterator[None]:
    """Package-scoped so it is in place before any module or class fixture of the tier runs."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(subprocess.Popen, "_execute_child", _refusing("subprocess.Popen"))
        patch.setattr(multiprocessing.process.BaseProcess, "start", _refusing("multiprocessing start"))
        for name in ("fork", "forkpty", "posix_spawn", "posix_spawnp", "system"):
            if hasattr(os, name):
                patch.setattr(os, name, _refusing(f"os.{name}"))
        yield
    assert not ATTEMPTS, f"a unit-tier fixture tried to start a process: {ATTEMPTS}"


@pytest.fixture(autouse=True)
def _no_child_process(_in_process_only: None) -> Iterator[None]:
    before = len(ATTEMPTS)
    yield
    tried = ATTEMPTS[before:]
    del ATTEMPTS[before:]  # reported here, once, against the test that tried
    assert not tried, f"this unit test tried to start a process: {tried}"
