"""`samseg.pool:ModelThreadPool`, the name compose files and operators pass in CELERY_CUSTOM_WORKER_POOL.

A stable public alias: the pool lives in samseg.worker.pool with the rest of the worker.
"""

from samseg.worker.pool import ModelThreadPool

__all__ = ["ModelThreadPool"]
