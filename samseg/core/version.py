"""samseg's own version, as the installed distribution says (result.json's `samseg_version`)."""

from __future__ import annotations

import functools
from importlib.metadata import PackageNotFoundError, version


@functools.cache
def samseg_version() -> str:
    """The installed samseg's version; "0+unknown" when run from a tree that was never installed."""
    try:
        return version("samseg")
    except PackageNotFoundError:
        return "0+unknown"
