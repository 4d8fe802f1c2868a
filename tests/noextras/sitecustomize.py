"""Test-only: make a samseg subprocess behave as if only `pip install samseg` (no extras) had run.

tests/system/test_packaging.py puts this directory first on a subprocess's PYTHONPATH and lists, in
SAMSEG_TEST_BLOCKED_MODULES (comma-separated), the top-level modules of every installed distribution that a
plain `pip install .` would not bring (moto, flask, flower, pytest, …: computed from the packages' own
metadata, not written by hand). Importing one of them raises ModuleNotFoundError, exactly as in a venv that
lacks it, and writes one line `samseg_test_blocked_import NAME` to stderr so a test can see what was tried.

Nothing happens when the variable is unset.
"""

from __future__ import annotations

import importlib.abc
import os
import sys
from typing import Any

MARKER = "samseg_test_blocked_import"


class _Block(importlib.abc.MetaPathFinder):
    def __init__(self, names: frozenset[str]) -> None:
        self.names = names

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> None:
        top = fullname.partition(".")[0]
        if top in self.names:
            sys.stderr.write(f"{MARKER} {fullname}\n")
            raise ModuleNotFoundError(f"No module named {fullname!r} (not installed without extras)", name=fullname)
        return None


_names = frozenset(n for n in os.environ.get("SAMSEG_TEST_BLOCKED_MODULES", "").split(",") if n)
if _names:
    for _name in list(sys.modules):
        if _name.partition(".")[0] in _names:
            raise RuntimeError(f"{_name} was imported before sitecustomize could block it")
    sys.meta_path.insert(0, _Block(_names))
    # A library asking whether a package is installed (importlib.util.find_spec, e.g. torch's dynamo probing for
    # hypothesis) gets None, as in a venv without it, rather than the import error above.
    import importlib.util

    _find_spec = importlib.util.find_spec

    def _absent_find_spec(name: str, package: str | None = None) -> Any:
        if name.partition(".")[0] in _names:
            return None
        return _find_spec(name, package)

    importlib.util.find_spec = _absent_find_spec
