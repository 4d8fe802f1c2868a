"""What `samseg --help` imports, measured in a fresh interpreter (a subprocess: hence the integration tier)."""

from __future__ import annotations

import subprocess
import sys

from tests.support import REPO

HEAVY = ("torch", "sam2", "celery", "boto3", "kombu", "fastapi", "pydantic_settings", "samseg.core.settings")


def test_help_imports_nothing_heavy():
    """`samseg --help` (and every parse error) answers before the settings, Celery, boto3 or torch load."""
    code = (
        "import sys\n"
        "from samseg.cli import build_parser\n"
        "for argv in (['--help'], ['up', '--help'], ['segment', '--help'], ['queues', 'ensure', '--help']):\n"
        "    try:\n"
        "        build_parser().parse_args(argv)\n"
        "    except SystemExit:\n"
        "        pass\n"
        f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60, check=True
    )
    assert result.stdout.strip().splitlines()[-1] == "[]", result.stdout[-2000:]
