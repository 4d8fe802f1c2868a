"""A Celery pool for the GPU worker: a few threads sharing the process's one model.

Select it with `CELERY_CUSTOM_WORKER_POOL=samseg.pool:ModelThreadPool celery -A samseg worker --pool custom
--concurrency 2` (Celery's documented hook for an out-of-tree pool).

Why not `--pool solo`: solo runs one task at a time, so the CPU work around the model — the job-status
writes, decoding and orienting the image, sorting and bit-packing the masks, writing the work file — runs
while the GPU waits, and the next message is asked for only after the task ended. With two threads, the
next segment task is already received, has decoded its image and waits at the model's lock
(`Segmenter._lock`) while the current one runs; the model goes from one image to the next without a gap,
and the finished task's post-processing and acknowledgement overlap the next inference.

Why not Celery's plain `--pool threads`: it never sends `worker_process_init`, where samseg loads and warms
the model (and marks the worker ready for `samseg healthcheck worker`); solo and prefork send it. This pool
is Celery's threads pool plus that signal, sent exactly as the solo pool sends it. Like solo and threads, Celery
enforces no time limits in it; samseg.ops.watchdog does (it watches every pool built on those two).
"""

from __future__ import annotations

from typing import Any

from celery import signals
from celery.concurrency.thread import TaskPool


class ModelThreadPool(TaskPool):  # type: ignore[misc]
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # The worker passes (app, hostname) as initargs to every pool (see celery.concurrency.solo).
        initargs = self.options.get("initargs") or (None, None)
        signals.worker_process_init.send(sender=initargs[1])
