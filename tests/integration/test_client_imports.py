"""The SDK imports without the server's heavy dependencies, checked in a fresh interpreter (a subprocess)."""

from __future__ import annotations

import subprocess
import sys


def test_the_sdk_imports_without_torch_or_celery() -> None:
    code = (
        "import sys, samseg.client; "
        "bad = [m for m in ('torch', 'celery', 'sam2', 'kombu', 'boto3') if m in sys.modules]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
