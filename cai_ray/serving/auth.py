"""Bearer-token check for the Serve services, as ASGI middleware in the ingress deployment.

Ray Serve's HTTP proxy forwards every request it receives; nothing in Ray checks who sent it. The ingress of
each service therefore wraps its ASGI app in :class:`BearerTokenMiddleware`, which refuses (401) a request
whose ``Authorization: Bearer <token>`` header is missing or wrong, before any route or body parsing runs.
Only the token's SHA-256 digest leaves the process that read it (it travels in the deployment's arguments);
the comparison is constant-time.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
from collections.abc import Awaitable, Callable, MutableMapping
from pathlib import Path
from typing import Any

from cai_ray.config import ConfigError, ServeConfig

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


def token_digest(token: str) -> str:
    """The hex SHA-256 of a token (what the middleware compares)."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def read_token(serve: ServeConfig) -> str | None:
    """The bearer token named by ``serve.auth_token_file`` / ``serve.auth_token_env``; None when neither is set.

    Raises:
        ConfigError: the file or variable is missing or empty (the message names the key).
    """
    if serve.auth_token_file:
        path = Path(serve.auth_token_file).expanduser()
        if not path.is_file():
            raise ConfigError(f"serve.auth_token_file={serve.auth_token_file}: no such file; write the token into it "
                              "(e.g. `openssl rand -hex 32 > FILE; chmod 600 FILE`)")
        token = path.read_text(encoding="utf-8").strip()
        where = f"serve.auth_token_file={serve.auth_token_file}"
    elif serve.auth_token_env:
        token = os.environ.get(serve.auth_token_env, "").strip()
        where = f"serve.auth_token_env={serve.auth_token_env}"
    else:
        return None
    if not token:
        raise ConfigError(f"{where}: the token is empty; put a long random string there")
    return token


class BearerTokenMiddleware:
    """ASGI middleware: HTTP requests pass only with ``Authorization: Bearer <token>`` matching ``digest``."""

    def __init__(self, app: ASGIApp, *, digest: str) -> None:
        self.app = app
        self._digest = digest.encode("ascii")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Pass authorised requests (and lifespan events) on; answer the rest with 401."""
        if scope["type"] != "http" or self._authorised(scope):
            await self.app(scope, receive, send)
            return
        body = json.dumps({"error": {"message": "missing or wrong bearer token (send Authorization: Bearer <token>)",
                                     "type": "authentication_error", "code": "invalid_api_key"}}).encode()
        await send({"type": "http.response.start", "status": 401,
                    "headers": [(b"content-type", b"application/json"), (b"www-authenticate", b"Bearer"),
                                (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})

    def _authorised(self, scope: Scope) -> bool:
        header = dict(scope.get("headers") or []).get(b"authorization", b"")
        scheme, _, token = header.decode("latin-1").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return False
        return hmac.compare_digest(token_digest(token.strip()).encode("ascii"), self._digest)
