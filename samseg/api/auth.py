"""Bearer-token authentication for the API routes that act on jobs or reveal them.

`POST /jobs` lets its caller spend GPU time and claim a uuid before the app server uses it; `GET /jobs/{uuid}`
and `/metrics` reveal other people's jobs. They need `Authorization: Bearer <SAMSEG_API_TOKEN>`.

- Secure by default: with no token configured these routes answer 401 — the app server's way into samseg is
  SQS (guarded by IAM), so an open API is never needed in production.
- Rotation: SAMSEG_API_TOKEN may list several tokens (`new,old`); each is accepted until it is removed.
- Constant time: the presented token is compared with every accepted token, always all of them, through
  SHA-256 digests and `hmac.compare_digest`, so neither which token matched nor how long they are shows in
  the timing.
- 401 answers carry `WWW-Authenticate: Bearer` (RFC 6750), with `error="invalid_token"` when a token was
  presented and refused. The token itself is never logged.

Use (the Settings dependency is passed in, so `app.dependency_overrides[get_settings]` applies in tests):

    api_auth = require_token(get_settings)
    @app.post("/jobs", dependencies=[Depends(api_auth)])
"""

# No `from __future__ import annotations` here: FastAPI reads the dependency's annotations at runtime, and
# the closure's `Depends(settings_dependency)` cannot be resolved from a string (it is not a module global).
import hashlib
import hmac
from collections.abc import Callable, Sequence
from typing import Annotated

import structlog
from fastapi import Depends, HTTPException, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from samseg.core.settings import Settings, get_settings

log = structlog.get_logger(__name__)

REALM = "samseg"
# auto_error=False: every refusal goes through `_unauthorized`, so all of them look the same on the wire.
# Declaring the scheme also gives /docs its "Authorize" button.
bearer_scheme = HTTPBearer(auto_error=False, description="SAMSEG_API_TOKEN (comma-separated list: any of them)")


def token_matches(candidate: str, accepted: Sequence[str]) -> bool:
    """True if `candidate` is one of `accepted`; examines every accepted token whatever the outcome."""
    digest = hashlib.sha256(candidate.encode("utf-8")).digest()
    matched = False
    for token in accepted:
        matched |= hmac.compare_digest(digest, hashlib.sha256(token.encode("utf-8")).digest())
    return matched


def check_credentials(credentials: HTTPAuthorizationCredentials | None, settings: Settings) -> None:
    """Raise the 401 for missing, wrong or unconfigurable credentials; return quietly when they are right."""
    accepted = settings.api_tokens()
    if not accepted:
        log.info("api_auth_refused", reason="SAMSEG_API_TOKEN is not set")
        raise _unauthorized("API authentication is not configured on this server (SAMSEG_API_TOKEN is unset)")
    if credentials is None:
        raise _unauthorized("missing bearer token: send Authorization: Bearer <SAMSEG_API_TOKEN>")
    if not token_matches(credentials.credentials, accepted):
        log.info("api_auth_refused", reason="wrong token")
        raise _unauthorized("invalid bearer token", error="invalid_token")


def require_token(settings_dependency: Callable[..., Settings] = get_settings) -> Callable[..., None]:
    """A FastAPI dependency that admits only requests carrying one of SAMSEG_API_TOKEN's tokens."""

    def bearer_token(
        credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer_scheme)],
        settings: Annotated[Settings, Depends(settings_dependency)],
    ) -> None:
        check_credentials(credentials, settings)

    return bearer_token


def _unauthorized(detail: str, *, error: str | None = None) -> HTTPException:
    challenge = f'Bearer realm="{REALM}"' + (f', error="{error}"' if error else "")
    return HTTPException(status.HTTP_401_UNAUTHORIZED, detail=detail, headers={"WWW-Authenticate": challenge})
