"""The one exception type that means "this job cannot be done", carrying the code the app server sees."""

from __future__ import annotations


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
