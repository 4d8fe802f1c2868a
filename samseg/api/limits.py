"""A request-body cap that holds before anything reads the body (FastAPI parses a JSON body before it
resolves dependencies, the bearer check included — so without this, anyone could make the API buffer
any amount).

`BodySizeLimit` is plain ASGI middleware: a declared `Content-Length` over the cap is answered 413 at once
(the body is never read); a body without one (chunked) is counted as it streams in and cut off with 413 the
moment it passes the cap. Wire it in the app factory:

    app.add_middleware(BodySizeLimit, max_bytes=settings.api_max_body_bytes)
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


class BodyTooLarge(Exception):
    pass


class BodySizeLimit:
    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = _content_length(scope)
        if declared is not None and declared > self.max_bytes:
            await self._refuse(send)
            return
        seen = 0
        started = refused = False

        async def counted_receive() -> Message:
            nonlocal seen, started, refused
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    # Answer now: FastAPI turns any exception raised while it reads the body into a 400.
                    if not started:
                        started = refused = True
                        await self._refuse(send)
                    raise BodyTooLarge
            return message

        async def tracked_send(message: Message) -> None:
            nonlocal started
            if refused:
                return  # the 413 went out; whatever the app answers after it is dropped
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        # BodyTooLarge: answered 413 in counted_receive (or the response had already started).
        with contextlib.suppress(BodyTooLarge):
            await self.app(scope, counted_receive, tracked_send)

    async def _refuse(self, send: Send) -> None:
        body = json.dumps({"detail": f"request body over {self.max_bytes} bytes"}).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": 413, "headers": [*headers, (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})


def _content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers") or ():
        if name.lower() == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None
