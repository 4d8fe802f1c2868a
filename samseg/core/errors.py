"""The one exception type that means "this job cannot be done", carrying the code the app server sees."""

from __future__ import annotations

import re


class JobError(Exception):
    """An expected, permanent failure of one job (bad input, unreachable image, model error).

    `code` is a stable machine-readable string sent in the `failed` callback; `message` is for humans.
    """

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message

    def __reduce__(self) -> tuple[type[JobError], tuple[str, str]]:
        # Celery pickles exceptions between the pool child and the errback; keep both fields.
        return (JobError, (self.code, self.message))


class JobCanceled(Exception):
    """The job was canceled while a stage worked on it (DELETE /jobs/{uuid} or a cancel message).

    Raised from inside long work (between the mask decoder's batches) when the stage's `should_stop` check says
    so; the stage then ends the run `canceled` instead of finishing. Not a failure: no error code.
    """


# Failures of the infrastructure around a job rather than of the job: SQS, S3, DynamoDB or SQLite unreachable,
# throttling, 5xx. A stage that meets one is retried later (the outage usually ends) instead of failing the job.
_TRANSIENT_AWS_CODES = frozenset(
    {
        "ThrottlingException",
        "ProvisionedThroughputExceededException",
        "RequestLimitExceeded",
        "InternalServerError",
        "ServiceUnavailable",
        "SlowDown",
        "RequestTimeout",
        "InternalError",
    }
)


def is_transient(exc: BaseException) -> bool:
    """True for an outage-like failure (connection refused or reset, timeout, throttling, 5xx)."""
    import sqlite3

    from botocore.exceptions import BotoCoreError, ClientError
    from kombu.exceptions import OperationalError

    if isinstance(exc, JobError):
        return False
    if isinstance(exc, OperationalError | BotoCoreError | ConnectionError | TimeoutError):
        return True  # BotoCoreError: EndpointConnectionError, ConnectTimeoutError, ReadTimeoutError, …
    if isinstance(exc, ClientError):
        error = exc.response.get("Error", {})
        status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
        return status >= 500 or error.get("Code") in _TRANSIENT_AWS_CODES
    if isinstance(exc, sqlite3.OperationalError):
        return "locked" in str(exc) or "busy" in str(exc)
    cause = exc.__cause__ or exc.__context__
    return cause is not None and cause is not exc and is_transient(cause)


# An absolute POSIX path that is not part of a URL: a `/` preceded by nothing, a space, a quote or `(`
# (never by `:`, `/`, `=`, `?`, `&` or a word character, so `https://host/a/b?x=/y` is left alone).
_HOST_PATH = re.compile(r"(?<![\w:/.~=?&-])/(?:[\w.@+~-]+/?)+")
HIDDEN_PATH = "<path>"


def scrub_host_paths(text: str) -> str:
    """`text` with this host's file paths replaced by `<path>`, for messages that leave the host.

    An OSError's text names the file (`[Errno 28] No space left on device: '/var/lib/samseg/scratch/…'`);
    the app server and API clients get the error code and the gist, not the worker's directory layout.
    URLs (`https://host/path`) are kept: they are the caller's own input.
    """
    return _HOST_PATH.sub(HIDDEN_PATH, text)
