"""Optional signed mask URLs: `?expires=<unix seconds>&signature=<HMAC-SHA256>`, bound to the URL's path.

Without SAMSEG_ASSET_URL_SECRET a mask is served to anyone who has (or guesses) its URL — uuids are the app
server's, often sequential. With it, every `mask_url` samseg hands out carries an expiry and a signature
over exactly its path and that expiry, so a URL cannot be guessed, outlives neither its TTL, nor can its
signature be moved to another mask or another job. Unset, URLs stay exactly as before (the contract the app
server relies on).

The signed message is `samseg-asset-v1\\n{path}\\n{expires}`: the prefix keeps these MACs from ever meaning
anything else under the same key, and the separators make (path, expires) pairs unambiguous. `path` is the
route path the API serves (`/assets/{uuid}/mask_images/mask_000.png`), not the public URL, so a reverse
proxy that strips a prefix from SAMSEG_PUBLIC_BASE_URL changes nothing.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import time
from typing import Literal
from urllib.parse import urlencode

from pydantic import SecretStr

from samseg.core.settings import Settings

Reason = Literal["missing", "malformed", "bad_signature", "expired"]
_DOMAIN = b"samseg-asset-v1"
_MAX_EXPIRES_DIGITS = 12  # year 33658: anything longer is not a timestamp samseg wrote


class AssetSignatureError(Exception):
    """The request's signature does not admit it; `reason` says why (the API answers 403 for all of them)."""

    def __init__(self, reason: Reason, message: str) -> None:
        super().__init__(message)
        self.reason: Reason = reason
        self.message = message


def _key(secret: SecretStr | str) -> bytes:
    value = secret.get_secret_value() if isinstance(secret, SecretStr) else secret
    return value.encode("utf-8")


def _mac(path: str, expires: int, secret: SecretStr | str) -> str:
    message = b"\n".join((_DOMAIN, path.encode("utf-8"), str(expires).encode("ascii")))
    digest = hmac.new(_key(secret), message, hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


def sign(path: str, secret: SecretStr | str, ttl: int, now: float) -> str:
    """The query string (`expires=…&signature=…`) that admits `path` until `now + ttl`."""
    if not path.startswith("/"):
        raise ValueError(f"sign the route path (starting with '/'), not {path!r}")
    if ttl < 1:
        raise ValueError(f"ttl must be at least 1 second, got {ttl}")
    expires = int(now) + ttl
    return urlencode({"expires": expires, "signature": _mac(path, expires, secret)})


def verify(path: str, expires: str | None, signature: str | None, secret: SecretStr | str, now: float) -> None:
    """Return if `signature` is ours for `path` and `expires` is still ahead; else raise AssetSignatureError.

    The signature is checked before the expiry, so "expired" is only ever said of a URL samseg really issued.
    """
    if not expires or not signature:
        raise AssetSignatureError("missing", "this URL needs its expires and signature parameters")
    if not expires.isascii() or not expires.isdigit() or len(expires) > _MAX_EXPIRES_DIGITS:
        raise AssetSignatureError("malformed", "the expires parameter is not a unix timestamp")
    expected = _mac(path, int(expires), secret)
    if not hmac.compare_digest(expected.encode("ascii"), signature.encode("utf-8", "surrogatepass")):
        raise AssetSignatureError("bad_signature", "the signature does not match this URL")
    if now >= int(expires):
        raise AssetSignatureError("expired", "this URL has expired")


def signed_mask_url(base_url: str, path: str, settings: Settings, now: float | None = None) -> str:
    """`base_url + path`, signed for SAMSEG_ASSET_URL_TTL_SECONDS when SAMSEG_ASSET_URL_SECRET is set."""
    url = base_url.rstrip("/") + path
    if settings.asset_url_secret is None:
        return url
    query = sign(path, settings.asset_url_secret, settings.asset_url_ttl, time.time() if now is None else now)
    return f"{url}?{query}"


def verify_request(path: str, expires: str | None, signature: str | None, settings: Settings) -> None:
    """The API's check for one asset request: a no-op without a secret, else `verify` against the clock."""
    if settings.asset_url_secret is not None:
        verify(path, expires, signature, settings.asset_url_secret, time.time())
