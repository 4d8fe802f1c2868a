"""The two seams where samseg keeps state — files (`BlobStore`) and job records (`JobStore`) — and the one
factory that builds them from Settings.

    SAMSEG_STORAGE_URL    unset → the local SAMSEG_ASSETS_DIR;  s3://BUCKET/PREFIX → S3
    SAMSEG_JOB_STORE_URL  unset → sqlite in SAMSEG_ASSETS_DIR;  sqlite:///PATH;  dynamodb://TABLE

Each process builds its stores once (worker: per pool process, after the fork; API: in its lifespan) and
passes them to the code that needs them; nothing reads a store from a module global.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from samseg.core.settings import Settings
from samseg.stores.blobs import BlobStore, LocalBlobs, S3Blobs
from samseg.stores.jobs import JobBackend, JobStore

if TYPE_CHECKING:
    from samseg.stores.layout import Assets
    from samseg.stores.sql_jobs import SqlJobs

__all__ = ["Stores", "build_stores"]


@dataclass(frozen=True)
class Stores:
    blobs: BlobStore
    jobs: JobStore

    @property
    def assets(self) -> Assets:
        from samseg.stores.layout import Assets  # assets → results → stores.blobs: imported here to keep one direction

        return Assets(self.blobs)


def build_stores(settings: Settings) -> Stores:
    jobs = JobStore(build_job_backend(settings), settings.stale_run_seconds, settings.sweep_grace_seconds)
    return Stores(blobs=build_blobs(settings), jobs=jobs)


def build_blobs(settings: Settings) -> BlobStore:
    if not settings.storage_url:
        return LocalBlobs(settings.assets_dir)
    parts = urlsplit(settings.storage_url)
    from samseg.core.aws import client

    # boto3's pool defaults to 10 connections; one per upload thread, plus the API's concurrent readers.
    s3 = client(settings, "s3", settings.aws_endpoint_url_s3, max_pool_connections=settings.s3_max_concurrency + 4)
    return S3Blobs(s3, parts.netloc, parts.path, concurrency=settings.s3_max_concurrency)


def build_job_backend(settings: Settings) -> JobBackend:
    url = settings.job_store_url
    ttl = settings.job_record_ttl_seconds
    if url.startswith("dynamodb://"):
        from samseg.core.aws import client
        from samseg.stores.dynamo_jobs import DynamoJobs

        dynamo = client(settings, "dynamodb", settings.aws_endpoint_url_dynamodb)
        return DynamoJobs(dynamo, urlsplit(url).netloc, ttl)
    return sqlite_backend(Path(url.removeprefix("sqlite:///")), ttl)


def sqlite_backend(path: Path, ttl: float) -> SqlJobs:
    from samseg.stores.sql_jobs import SqlJobs

    return SqlJobs(path, ttl)
