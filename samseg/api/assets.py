"""The published masks, result.json and job-level outputs, at the URLs the callback gave out.

Only `{uuid}/mask_images/mask_NNN.png`, `{uuid}/result.json`, `{uuid}/label_map.png` and `{uuid}/overlay.jpg`
exist as URLs, and only once the job is published (its result.json exists), so nothing else in the store —
work files, a job being written, a planted symlink — can be reached. From a local directory the file is sent
as is; from S3 the object is streamed (SAMSEG_S3_ASSETS=proxy, any client works) or the client is redirected
to a presigned GET that expires in minutes (redirect: the API moves no bytes).
"""

from __future__ import annotations

import threading
import time
from typing import Annotated

from fastapi import APIRouter, Depends, HTTPException, Request, Response
from fastapi.responses import FileResponse, RedirectResponse, StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials

from samseg.api.auth import bearer_scheme, check_credentials
from samseg.api.deps import SettingsDep, StoresDep
from samseg.api.jobs import JobIdParam
from samseg.core.contracts import UUID_PATTERN
from samseg.stores import Stores
from samseg.stores.layout import JOB_FILES, MASK_NAME, job_file_key, mask_key
from samseg.stores.results import MASK_DIR, RESULT_FILE
from samseg.stores.signed_urls import AssetSignatureError, verify_request

router = APIRouter(tags=["assets"])

# Masks are for whoever holds the link, not for shared caches (the uuid may be guessable).
CACHE_CONTROL = "private, max-age=300"
PRESIGN_SECONDS = 300


class PublishedCache:
    """Remembers for a few seconds that a job is published: a job's masks are fetched in bursts."""

    def __init__(self, seconds: float = 10.0) -> None:
        self.seconds = seconds
        self._until: dict[str, float] = {}
        self._lock = threading.Lock()

    def check(self, uuid: str, stores: Stores) -> bool:
        now = time.monotonic()
        with self._lock:
            if self._until.get(uuid, 0.0) > now:
                return True
        if not stores.assets.is_published(uuid):
            return False
        with self._lock:
            if len(self._until) > 10_000:
                self._until.clear()
            self._until[uuid] = now + self.seconds
        return True


@router.get("/assets/{uuid}/mask_images/{name}", response_class=Response)
def mask_image(
    uuid: JobIdParam,
    name: str,
    request: Request,
    stores: StoresDep,
    settings: SettingsDep,
    expires: str | None = None,
    signature: str | None = None,
) -> Response:
    """A mask PNG; with SAMSEG_ASSET_URL_SECRET only through the signed URL the callback gave out."""
    if not UUID_PATTERN.fullmatch(uuid) or not MASK_NAME.fullmatch(name):
        raise HTTPException(404, detail="not found")
    try:
        verify_request(f"/assets/{uuid}/{MASK_DIR}/{name}", expires, signature, settings)
    except AssetSignatureError as exc:
        raise HTTPException(403, detail=exc.message) from None
    published: PublishedCache = request.app.state.published
    if not published.check(uuid, stores):
        raise HTTPException(404, detail="not found")
    return _serve(stores, settings.s3_assets, mask_key(uuid, name), "image/png")


@router.get("/assets/{uuid}/{name}", response_class=Response)
def job_file(
    uuid: JobIdParam,
    name: str,
    request: Request,
    stores: StoresDep,
    settings: SettingsDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer_scheme)],
    expires: str | None = None,
    signature: str | None = None,
) -> Response:
    """result.json, label_map.png or overlay.jpg (the callback's `result_url`, `label_map_url`, `overlay_url`).

    With SAMSEG_ASSET_URL_SECRET: through the signed URL the callback gave out, or with the API token (how
    result.json was reached before it had a signed URL).
    """
    if not UUID_PATTERN.fullmatch(uuid) or name not in JOB_FILES:
        raise HTTPException(404, detail="not found")
    if settings.asset_url_secret is not None:
        if expires is None and signature is None:
            check_credentials(credentials, settings)
        else:
            try:
                verify_request(f"/assets/{uuid}/{name}", expires, signature, settings)
            except AssetSignatureError as exc:
                raise HTTPException(403, detail=exc.message) from None
    if name != RESULT_FILE:
        published: PublishedCache = request.app.state.published
        if not published.check(uuid, stores):
            raise HTTPException(404, detail="not found")
    return _serve(stores, settings.s3_assets, job_file_key(uuid, name), JOB_FILES[name])


def _serve(stores: Stores, mode: str, key: str, media_type: str) -> Response:
    blobs = stores.blobs
    path = blobs.local_path(key)
    if path is not None:
        return FileResponse(path, media_type=media_type, headers={"Cache-Control": CACHE_CONTROL})
    if mode == "redirect":
        if blobs.head(key) is None:
            raise HTTPException(404, detail="not found")
        url = blobs.presigned_get(key, PRESIGN_SECONDS)
        if url is not None:
            return RedirectResponse(url, status_code=307, headers={"Cache-Control": "no-store"})
    opened = blobs.open(key)
    if opened is None:
        raise HTTPException(404, detail="not found")
    info, chunks = opened
    headers = {"Content-Length": str(info.size), "ETag": info.etag, "Cache-Control": CACHE_CONTROL}
    return StreamingResponse(chunks, media_type=media_type, headers=headers)
