"""Issue #15 (3f): no host paths in what leaves the host — the callback's and the status's error messages.

The messages are built from exception texts (samseg.worker.base.storage_errors: `disk_full`, `storage_error`
from an OSError's str, which names the file); ErrorInfo and CallbackStatus scrub them wherever they are built.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from samseg.core.contracts import CallbackBody, CallbackStatus, ErrorInfo
from samseg.core.errors import JobError, scrub_host_paths
from samseg.worker.base import error_info, storage_errors


def _job_error_from_a_real_oserror(tmp_path: Path) -> JobError:
    missing = tmp_path / "scratch" / "run-1" / "image.png"
    with pytest.raises(JobError) as caught, storage_errors():
        missing.read_bytes()  # FileNotFoundError naming the full path
    return caught.value


def test_a_storage_error_reaches_the_callback_without_the_host_path(tmp_path):
    error = _job_error_from_a_real_oserror(tmp_path)
    assert str(tmp_path) in error.message  # the raw text names the file ...
    info = error_info(error)
    body = CallbackBody(uuid="u-1", status="failed", error=info).model_dump_json()
    assert str(tmp_path) not in body and "scratch" not in body, body  # ... the callback does not
    assert info.code == "storage_error" and "<path>" in info.message


def test_disk_full_message_is_scrubbed():
    exc = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "/var/lib/samseg/scratch/ab12/masks.npz")
    with pytest.raises(JobError) as caught, storage_errors():
        raise exc
    info = error_info(caught.value)
    assert info.code == "disk_full" and "/var/lib" not in info.message, info.message


def test_scrubbing_keeps_urls_and_plain_text():
    assert scrub_host_paths("image download failed: https://img.example/a/b.png?next=/c") == (
        "image download failed: https://img.example/a/b.png?next=/c"
    )
    assert scrub_host_paths("3/4 of the masks") == "3/4 of the masks"
    assert scrub_host_paths("FileNotFoundError: '/srv/assets/.samseg/work/u/r/x'") == "FileNotFoundError: '<path>'"
    assert CallbackStatus(delivered=False, attempts=1, error="open /etc/samseg/ca.pem failed").error == (
        "open <path> failed"
    )
    assert ErrorInfo(code="x", message="ok").message == "ok"
