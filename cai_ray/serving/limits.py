"""Request-body size limit for the Serve services, as ASGI middleware (Serve and FastAPI set none).

A declared ``Content-Length`` over the limit is refused before the body is read; a chunked body is counted
as it arrives and refused once it passes the limit. Either way the client gets 413 naming the limit and
its config key.
"""

from __future__ import annotations

import json
from collections.abc import MutableMapping
from typing import Any

from cai_ray.serving.auth import ASGIApp, Receive, Scope, Send


class BodySizeLimitMiddleware:
    """ASGI middleware: HTTP request bodies of at most ``max_bytes`` bytes."""

    def __init__(self, app: ASGIApp, *, max_bytes: int, key: str) -> None:
        self.app = app
        self._max = max_bytes
        self._key = key  # the config key that sets the limit, named in the refusal

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Read the body (at most the limit) and hand it on; answer a larger one with 413."""
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self._max:
            await self._refuse(send)
            return
        # Read here, not counted inside the app: an error raised from the app's receive would reach the
        # app's own error handler, which answers 500 first.
        body, more = b"", True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self._max:
                await self._refuse(send)
                return
        replayed = False

        async def replay() -> MutableMapping[str, Any]:
            nonlocal replayed
            if replayed:
                return await receive()  # after the body: waits for the disconnect
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)

    async def _refuse(self, send: Send) -> None:
        body = json.dumps({"error": {"message": f"request body over {self._max} bytes ({self._key}); send fewer "
                                                "items per request", "type": "request_too_large"}}).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})
