"""Where files live: a local directory (one host) or an S3 bucket (any number of hosts), behind one Protocol.

Keys are `/`-separated relative paths (`{uuid}/mask_images/mask_000.png`, `.samseg/work/{uuid}/{run}/source`).
Both stores write each object whole: a local file appears by one rename of a complete temporary file, an S3
object by one PUT, so a reader sees either nothing or the whole object, never a torn one.
"""

from __future__ import annotations

import os
import secrets
import shutil
import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client


class BlobError(OSError):
    """The store refused or failed an operation (permissions, bucket missing, disk full)."""


@dataclass(frozen=True)
class BlobInfo:
    size: int
    etag: str
    modified: float  # unix seconds
    content_type: str | None = None


@dataclass(frozen=True)
class Upload:
    """One object to write; `data` is called in the upload thread, so only a few are ever held in memory."""

    key: str
    data: Callable[[], bytes]
    content_type: str | None = None


class BlobStore(Protocol):
    def put(self, key: str, data: bytes, content_type: str | None = None) -> None: ...

    def put_many(self, uploads: Iterable[Upload]) -> None:
        """Write all, concurrently, holding at most the pool's width of encoded objects in memory."""
        ...

    def put_file(self, key: str, path: Path, content_type: str | None = None) -> None: ...

    def get(self, key: str) -> bytes | None: ...

    def get_file(self, key: str, dest: Path) -> bool:
        """Copy the object to a local file (for data too large to hold, or to memory-map); False if absent."""
        ...

    def head(self, key: str) -> BlobInfo | None: ...

    def open(self, key: str) -> tuple[BlobInfo, Iterator[bytes]] | None:
        """The object's metadata and its bytes in chunks, for streaming responses; None if absent."""
        ...

    def delete(self, keys: Iterable[str]) -> None: ...

    def delete_prefix(self, prefix: str) -> int: ...

    def walk(self, prefix: str) -> Iterator[tuple[str, BlobInfo]]: ...

    def children(self, prefix: str, start_after: str = "", limit: int = 1000) -> list[str]:
        """Names of the 'folders' directly under `prefix` (sorted, after `start_after`), at most `limit`."""
        ...

    def local_path(self, key: str) -> Path | None:
        """A file on this host holding the object (local store only), for zero-copy serving."""
        ...

    def presigned_get(self, key: str, expires_in: int) -> str | None:
        """A URL that fetches the object without credentials (S3 only)."""
        ...

    def check(self) -> str:
        """Raise if the store cannot be written; a short description for readiness reports."""
        ...


def check_key(key: str) -> str:
    parts = key.split("/")
    if not key or key.startswith("/") or any(p in ("", ".", "..") for p in parts) or "\\" in key or "\0" in key:
        raise ValueError(f"unsafe blob key {key!r}")
    return key


CHUNK = 256 * 1024


class LocalBlobs:
    """A directory on this host: the embedded default, and what one host needs (no S3 account)."""

    def __init__(self, root: Path, concurrency: int | None = None) -> None:
        self.root = root
        # Local writes are CPU-bound (zlib releases the GIL): more threads than cores only add overhead.
        self.concurrency = concurrency or min(8, os.cpu_count() or 1)

    def path(self, key: str) -> Path:
        return self.root / check_key(key)

    def put(self, key: str, data: bytes, content_type: str | None = None) -> None:
        self._write(key, lambda out: out.write(data))

    def put_file(self, key: str, path: Path, content_type: str | None = None) -> None:
        def copy(out: IO[bytes]) -> None:
            with path.open("rb") as src:
                shutil.copyfileobj(src, out, CHUNK)

        self._write(key, copy)

    def _write(self, key: str, fill: Callable[[IO[bytes]], Any]) -> None:
        final = self.path(key)
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = final.with_name(f".{final.name}.{secrets.token_hex(4)}.tmp")
        try:
            with tmp.open("wb") as out:
                fill(out)
            os.replace(tmp, final)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    def put_many(self, uploads: Iterable[Upload]) -> None:
        _run_bounded(lambda u: self.put(u.key, u.data(), u.content_type), uploads, self.concurrency)

    def get(self, key: str) -> bytes | None:
        path = self._existing(key)
        return path.read_bytes() if path else None

    def get_file(self, key: str, dest: Path) -> bool:
        path = self._existing(key)
        if path is None:
            return False
        shutil.copyfile(path, dest)
        return True

    def head(self, key: str) -> BlobInfo | None:
        path = self._existing(key)
        if path is None:
            return None
        stat = path.stat()
        return BlobInfo(
            size=stat.st_size, etag=f'"{stat.st_ino:x}-{stat.st_mtime_ns:x}-{stat.st_size:x}"', modified=stat.st_mtime
        )

    def open(self, key: str) -> tuple[BlobInfo, Iterator[bytes]] | None:
        info = self.head(key)
        path = self._existing(key)
        if info is None or path is None:
            return None

        def chunks() -> Iterator[bytes]:
            with path.open("rb") as src:
                while chunk := src.read(CHUNK):
                    yield chunk

        return info, chunks()

    def _existing(self, key: str) -> Path | None:
        """The file, if it is a regular file reached without following a symlink anywhere below the root."""
        path = self.path(key)
        probe = path
        while probe != self.root:
            if probe.is_symlink():
                return None
            probe = probe.parent
        return path if path.is_file() else None

    def delete(self, keys: Iterable[str]) -> None:
        for key in keys:
            self.path(key).unlink(missing_ok=True)

    def delete_prefix(self, prefix: str) -> int:
        target = self.path(prefix.rstrip("/"))
        if target.is_symlink() or target.is_file():
            target.unlink(missing_ok=True)
            return 1
        if not target.is_dir():
            return 0
        count = sum(len(files) for _, _, files in os.walk(target))
        shutil.rmtree(target, ignore_errors=True)
        for parent in target.parents:  # drop folders the removal left empty (…/work/{uuid}/), up to the root
            if parent == self.root or self.root not in parent.parents:
                break
            try:
                parent.rmdir()
            except OSError:
                break
        return count

    def walk(self, prefix: str) -> Iterator[tuple[str, BlobInfo]]:
        base = self.path(prefix.rstrip("/"))
        if not base.is_dir() or base.is_symlink():
            return
        found: list[tuple[str, BlobInfo]] = []
        for folder, _dirs, files in os.walk(base):  # never follows symlinked folders
            for name in files:
                full = Path(folder) / name
                stat = full.lstat()
                found.append((full.relative_to(self.root).as_posix(), BlobInfo(stat.st_size, "", stat.st_mtime)))
        yield from sorted(found, key=lambda item: item[0])  # key order, as S3 lists

    def children(self, prefix: str, start_after: str = "", limit: int = 1000) -> list[str]:
        base = self.root / prefix.rstrip("/") if prefix.strip("/") else self.root
        if not base.is_dir():
            return []
        names = sorted(e.name for e in os.scandir(base) if e.is_dir(follow_symlinks=False) and e.name > start_after)
        return names[:limit]

    def local_path(self, key: str) -> Path | None:
        return self._existing(key)

    def presigned_get(self, key: str, expires_in: int) -> str | None:
        return None

    def check(self) -> str:
        probe = self.root / ".samseg" / f".probe-{secrets.token_hex(4)}"
        probe.parent.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"ok")
        probe.unlink()
        return f"directory {self.root}"


class S3Blobs:
    """An S3 bucket (and key prefix): what lets io workers, GPU workers and the API run on separate hosts.

    The many small PUTs of one job (a PNG per mask) go through a bounded thread pool; boto3's connection
    pool is sized to match (its default of 10 would make the 11th thread wait for a connection).
    """

    def __init__(self, client: S3Client, bucket: str, prefix: str = "", concurrency: int = 16) -> None:
        self.client = client
        self.bucket = bucket
        self.prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
        self.concurrency = concurrency

    def _key(self, key: str) -> str:
        return self.prefix + check_key(key)

    def put(self, key: str, data: bytes, content_type: str | None = None) -> None:
        if content_type:
            self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data, ContentType=content_type)
        else:
            self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data)

    def put_file(self, key: str, path: Path, content_type: str | None = None) -> None:
        extra: dict[str, Any] = {"ExtraArgs": {"ContentType": content_type}} if content_type else {}
        self.client.upload_file(str(path), self.bucket, self._key(key), **extra)

    def put_many(self, uploads: Iterable[Upload]) -> None:
        _run_bounded(lambda u: self.put(u.key, u.data(), u.content_type), uploads, self.concurrency)

    def get(self, key: str) -> bytes | None:
        try:
            response = self.client.get_object(Bucket=self.bucket, Key=self._key(key))
        except self.client.exceptions.NoSuchKey:
            return None
        data: bytes = response["Body"].read()
        return data

    def get_file(self, key: str, dest: Path) -> bool:
        from botocore.exceptions import ClientError

        try:
            self.client.download_file(self.bucket, self._key(key), str(dest))
        except ClientError as exc:
            if _status(exc) == 404:
                return False
            raise
        return True

    def head(self, key: str) -> BlobInfo | None:
        from botocore.exceptions import ClientError

        try:
            response = self.client.head_object(Bucket=self.bucket, Key=self._key(key))
        except ClientError as exc:
            if _status(exc) == 404:
                return None
            raise
        return BlobInfo(
            size=int(response["ContentLength"]),
            etag=str(response["ETag"]),
            modified=response["LastModified"].timestamp(),
            content_type=response.get("ContentType"),
        )

    def open(self, key: str) -> tuple[BlobInfo, Iterator[bytes]] | None:
        try:
            response = self.client.get_object(Bucket=self.bucket, Key=self._key(key))
        except self.client.exceptions.NoSuchKey:
            return None
        info = BlobInfo(
            size=int(response["ContentLength"]),
            etag=str(response["ETag"]),
            modified=response["LastModified"].timestamp(),
            content_type=response.get("ContentType"),
        )
        body = response["Body"]

        def chunks() -> Iterator[bytes]:
            try:
                yield from body.iter_chunks(CHUNK)
            finally:
                body.close()

        return info, chunks()

    def delete(self, keys: Iterable[str]) -> None:
        batch: list[str] = []
        for key in keys:
            batch.append(self._key(key))
            if len(batch) == 1000:
                self._delete_batch(batch)
                batch = []
        if batch:
            self._delete_batch(batch)

    def _delete_batch(self, full_keys: list[str]) -> None:
        response = self.client.delete_objects(
            Bucket=self.bucket, Delete={"Objects": [{"Key": k} for k in full_keys], "Quiet": True}
        )
        errors = response.get("Errors") or []
        if errors:
            raise BlobError(f"S3 refused to delete {len(errors)} objects, e.g. {errors[0]}")

    def delete_prefix(self, prefix: str) -> int:
        keys = [key for key, _ in self.walk(prefix)]
        self.delete(keys)
        return len(keys)

    def walk(self, prefix: str) -> Iterator[tuple[str, BlobInfo]]:
        full = self._key(prefix.rstrip("/")) + "/" if prefix.strip("/") else self.prefix
        paginator = self.client.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=self.bucket, Prefix=full):
            for item in page.get("Contents", []):
                key = item["Key"][len(self.prefix) :]
                info = BlobInfo(
                    size=int(item["Size"]), etag=str(item["ETag"]), modified=item["LastModified"].timestamp()
                )
                yield key, info

    def children(self, prefix: str, start_after: str = "", limit: int = 1000) -> list[str]:
        base = self.prefix + (prefix.strip("/") + "/" if prefix.strip("/") else "")
        kwargs: dict[str, Any] = {"Bucket": self.bucket, "Prefix": base, "Delimiter": "/", "MaxKeys": limit}
        if start_after:
            kwargs["StartAfter"] = base + start_after  # keys sort after it from the first name above start_after
        response = self.client.list_objects_v2(**kwargs)
        names = [p["Prefix"][len(base) :].rstrip("/") for p in response.get("CommonPrefixes", [])]
        return sorted(n for n in names if n > start_after)[:limit]

    def local_path(self, key: str) -> Path | None:
        return None

    def presigned_get(self, key: str, expires_in: int) -> str | None:
        url: str = self.client.generate_presigned_url(
            "get_object", Params={"Bucket": self.bucket, "Key": self._key(key)}, ExpiresIn=expires_in
        )
        return url

    def check(self) -> str:
        """The bucket answers, and a missing key answers 404: samseg reads only 404 as "absent".

        Without s3:ListBucket on the bucket (unconditioned: a grant limited by s3:prefix does not count for
        GET/HEAD) S3 answers 403 for a missing key, and every not-yet-published job would look like an error.
        """
        from botocore.exceptions import ClientError

        self.client.head_bucket(Bucket=self.bucket)
        probe = self._key(f".samseg/missing-key-probe-{secrets.token_hex(4)}")
        try:
            self.client.head_object(Bucket=self.bucket, Key=probe)
        except ClientError as exc:
            if _status(exc) == 403:
                raise BlobError(
                    f"missing keys answer 403 in s3://{self.bucket}: grant s3:ListBucket on the bucket "
                    "(config/iam-policy.json, docs/deployment.md#iam-permissions)"
                ) from exc
            if _status(exc) != 404:
                raise
        return f"s3://{self.bucket}/{self.prefix}"


def _status(exc: Any) -> int:
    return int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0))


def _run_bounded(work: Callable[[Upload], None], uploads: Iterable[Upload], width: int) -> None:
    """Run `work` over `uploads` with `width` threads, pulling the next item only when a thread is free.

    Executor.map would submit every item at once; pulling keeps memory at `width` encoded objects.
    """
    items = iter(uploads)
    lock = threading.Lock()
    errors: list[BaseException] = []

    def drain() -> None:
        while not errors:
            with lock:
                upload = next(items, None)
            if upload is None:
                return
            try:
                work(upload)
            except BaseException as exc:
                errors.append(exc)

    if width <= 1:
        drain()
    else:
        with ThreadPoolExecutor(max_workers=width, thread_name_prefix="samseg-put") as pool:
            for future in [pool.submit(drain) for _ in range(width)]:
                future.result()
    if errors:
        raise errors[0]
