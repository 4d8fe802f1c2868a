"""Direct tests of the failure mapping (issue #15): samseg.core.errors.is_transient, which decides "retry
through the outage" against "fail the job", and the functions that turn exceptions into the error codes an app
server sees (samseg.worker.base.error_info and storage_errors, StageTask.fetch_work, the segment stage,
samseg.stores.results.describe_segments). In-process, no stores and no broker: the collaborators are stubs.
"""

from __future__ import annotations

import errno
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from unittest import mock

import numpy as np
import pytest
from billiard.exceptions import TimeLimitExceeded
from botocore.exceptions import ClientError, EndpointConnectionError, ReadTimeoutError
from celery.exceptions import SoftTimeLimitExceeded
from kombu.exceptions import OperationalError

from samseg.core.errors import JobError, is_transient
from samseg.runtime.segmenter import Segmenter
from samseg.worker.base import error_info, storage_errors


def _client_error(code: str, status: int) -> ClientError:
    return ClientError({"Error": {"Code": code, "Message": "m"}, "ResponseMetadata": {"HTTPStatusCode": status}}, "Op")  # type: ignore[typeddict-item]


def _caused_by(cause: BaseException) -> Exception:
    try:
        try:
            raise cause
        except BaseException as inner:
            raise RuntimeError("wrapper") from inner
    except RuntimeError as outer:
        return outer


RUN = "0123456789abcdef0123456789abcdef"

TRANSIENT = {
    "connection refused": ConnectionRefusedError(errno.ECONNREFUSED, "refused"),
    "connection reset": ConnectionResetError(errno.ECONNRESET, "reset"),
    "timeout": TimeoutError("timed out"),
    "broken pipe": BrokenPipeError(errno.EPIPE, "broken pipe"),
    "kombu operational": OperationalError("broker down"),
    "botocore endpoint": EndpointConnectionError(endpoint_url="http://127.0.0.1:1"),
    "botocore read timeout": ReadTimeoutError(endpoint_url="http://127.0.0.1:1"),
    "throttling": _client_error("ThrottlingException", 400),
    "slow down": _client_error("SlowDown", 503),
    "5xx with any code": _client_error("WhateverServerSide", 502),
    "dynamo throughput": _client_error("ProvisionedThroughputExceededException", 400),
    "sqlite locked": sqlite3.OperationalError("database is locked"),
    "sqlite busy": sqlite3.OperationalError("database is busy"),
    "cause is an outage": _caused_by(ConnectionRefusedError(errno.ECONNREFUSED, "refused")),
}
PERMANENT = {
    "job error": JobError("image_not_found", "404"),
    "job error caused by an outage": JobError("x", "y").with_traceback(None),
    "access denied": _client_error("AccessDenied", 403),
    "no such key": _client_error("NoSuchKey", 404),
    "sqlite schema": sqlite3.OperationalError("no such table: jobs"),
    "value error": ValueError("bad"),
    "permission": PermissionError(errno.EACCES, "denied"),
    "cause is permanent": _caused_by(ValueError("bad")),
}
PERMANENT["job error caused by an outage"].__cause__ = ConnectionRefusedError()


@pytest.mark.parametrize("exc", TRANSIENT.values(), ids=TRANSIENT.keys())
def test_outages_are_transient(exc: BaseException) -> None:
    assert is_transient(exc) is True


@pytest.mark.parametrize("exc", PERMANENT.values(), ids=PERMANENT.keys())
def test_other_failures_are_not(exc: BaseException) -> None:
    assert is_transient(exc) is False


def test_a_self_referencing_cause_does_not_loop() -> None:
    exc = ValueError("loop")
    exc.__context__ = exc
    assert is_transient(exc) is False


# --- error_info: the code in the `failed` callback ---------------------------------------------------------


@pytest.mark.parametrize(
    ("exc", "code"),
    [
        (JobError("model_error", "boom"), "model_error"),
        (JobError("work_missing", "gone"), "work_missing"),
        (SoftTimeLimitExceeded(), "timeout"),
        (TimeLimitExceeded(600), "timeout"),
        (KeyError("x"), "internal_error"),
        (RuntimeError("unexpected"), "internal_error"),
    ],
)
def test_error_info_codes(exc: BaseException, code: str) -> None:
    info = error_info(exc)
    assert info.code == code
    if isinstance(exc, JobError):
        assert info.message == exc.message
    elif code == "internal_error":
        assert info.message.startswith(type(exc).__name__)


# --- storage_errors: blob-store failures --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("exc", "code"),
    [
        (OSError(errno.ENOSPC, "No space left on device"), "disk_full"),
        (OSError(errno.EDQUOT, "Disk quota exceeded"), "disk_full"),
        (PermissionError(errno.EACCES, "Permission denied"), "storage_error"),
        (OSError(errno.EROFS, "Read-only file system"), "storage_error"),
        (_client_error("AccessDenied", 403), "storage_error"),
        (_client_error("NoSuchBucket", 404), "storage_error"),
    ],
)
def test_storage_errors_map_permanent_failures(exc: Exception, code: str) -> None:
    with pytest.raises(JobError) as raised, storage_errors():
        raise exc
    assert raised.value.code == code
    assert raised.value.__cause__ is exc


@pytest.mark.parametrize(
    "exc",
    [
        ConnectionRefusedError(errno.ECONNREFUSED, "refused"),
        EndpointConnectionError(endpoint_url="http://127.0.0.1:1"),
        _client_error("SlowDown", 503),
    ],
)
def test_storage_errors_let_outages_through(exc: Exception) -> None:
    with pytest.raises(type(exc)) as raised, storage_errors():
        raise exc
    assert raised.value is exc  # re-raised as is: StageTask retries it


def test_storage_errors_leave_other_exceptions_alone() -> None:
    with pytest.raises(ValueError), storage_errors():
        raise ValueError("not storage")


# --- the functions that raise the codes -----------------------------------------------------------------------


def test_fetch_work_of_a_missing_file_is_work_missing(tmp_path: Path) -> None:
    from samseg.worker.base import StageTask
    from samseg.worker.stages import segment

    blobs = mock.Mock()
    blobs.get_file.return_value = False  # purged, or replaced by another run
    with mock.patch.object(StageTask, "stores", new_callable=mock.PropertyMock) as stores:
        stores.return_value = mock.Mock(blobs=blobs)
        with pytest.raises(JobError) as raised:
            segment.fetch_work({"uuid": "u1", "run_id": RUN}, "source", tmp_path / "source")
    assert raised.value.code == "work_missing"
    assert error_info(raised.value).code == "work_missing"
    (key, dest), _ = blobs.get_file.call_args
    assert "u1" in key and RUN in key and dest == tmp_path / "source"


def test_a_segmenter_crash_is_model_error(tmp_path: Path) -> None:
    """The segment stage maps anything the model raises (CUDA OOM, shape errors) to model_error."""
    from samseg.worker import stages

    @contextmanager
    def scratch() -> Iterator[Path]:
        yield tmp_path

    segmenter = mock.create_autospec(Segmenter, instance=True)  # a misnamed method fails, not passes silently
    segmenter.segment_packed_with_fallback.side_effect = RuntimeError("CUDA out of memory")
    task: Any = stages.segment._get_current_object()
    with (
        mock.patch.object(task, "hold", return_value=mock.Mock()),
        mock.patch.object(task, "scratch", scratch),
        mock.patch.object(task, "fetch_work", return_value=tmp_path / "source"),
        mock.patch.object(stages, "load_rgb", return_value=np.zeros((8, 8, 3), np.uint8)),
        mock.patch.object(stages, "get_segmenter", return_value=segmenter),
        pytest.raises(JobError) as raised,
    ):
        task.run({"uuid": "u1", "run_id": RUN, "image_url": "http://x/y.png"})
    assert raised.value.code == "model_error"
    assert "CUDA out of memory" in raised.value.message
    assert segmenter.segment_packed_with_fallback.call_count == 1


def test_a_timeout_in_the_segmenter_is_not_model_error(tmp_path: Path) -> None:
    """SoftTimeLimitExceeded passes through the model_error mapping, so the errback reports `timeout`."""
    from samseg.worker import stages

    @contextmanager
    def scratch() -> Iterator[Path]:
        yield tmp_path

    segmenter = mock.create_autospec(Segmenter, instance=True)  # a misnamed method fails, not passes silently
    segmenter.segment_packed_with_fallback.side_effect = SoftTimeLimitExceeded()
    task: Any = stages.segment._get_current_object()
    with (
        mock.patch.object(task, "hold", return_value=mock.Mock()),
        mock.patch.object(task, "scratch", scratch),
        mock.patch.object(task, "fetch_work", return_value=tmp_path / "source"),
        mock.patch.object(stages, "load_rgb", return_value=np.zeros((8, 8, 3), np.uint8)),
        mock.patch.object(stages, "get_segmenter", return_value=segmenter),
        pytest.raises(SoftTimeLimitExceeded) as raised,
    ):
        task.run({"uuid": "u1", "run_id": RUN, "image_url": "http://x/y.png"})
    assert error_info(raised.value).code == "timeout"


def test_an_empty_mask_is_internal_error(tmp_path: Path) -> None:
    from samseg.core.masks import PackedMasks, write_packed_masks
    from samseg.stores.results import describe_segments

    masks = [np.ones((4, 9), bool), np.zeros((4, 9), bool)]  # the second is empty: segmentation drops those
    write_packed_masks(tmp_path / "m.npy", masks, 2, 4, 9)
    with pytest.raises(JobError) as raised:
        describe_segments(PackedMasks(tmp_path / "m.npy", 9), [0.9, 0.9], [0.9, 0.9], lambda i: f"/m/{i}")
    assert raised.value.code == "internal_error"
    assert "mask 1" in raised.value.message
