"""The optional API key: with one, every API route wants ``Authorization: Bearer <key>`` and answers 401 without it.

The page (``/``, ``/static/...``, ``/favicon.ico``) and the API reference (``/docs``, ``/openapi.json``) stay open:
they hold no data, and the page asks for the key when the API refuses it. The key is compared in constant time
(SHA-256 digests of the sent and the expected key, through ``hmac.compare_digest``, so not even its length shows
in the timing) and is never part of a message, a log line or an answer.
"""

from __future__ import annotations

import hashlib
import hmac
from typing import Any

from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from ..errors import ConfigError

ENV_VAR = "DUALTOKEN_API_KEY"
SCHEME = "bearerAuth"  # the name of the security scheme in the OpenAPI document
PUBLIC_PATHS = frozenset({"/", "/favicon.ico", "/docs", "/openapi.json"})
PUBLIC_PREFIX = "/static/"
MISSING = "this server requires an API key: send the header 'Authorization: Bearer <key>'"
WRONG = "the API key is not valid: send the server's key as 'Authorization: Bearer <key>'"


def check_api_key(key: str, source: str) -> None:
    """ConfigError unless ``key`` can travel in a header: printable ASCII, no spaces. The message names ``source``
    (the option or variable it came from), never the key."""
    if not key:
        raise ConfigError(f"{source} is empty; expected a key of printable ASCII characters without spaces")
    if not all("!" <= char <= "~" for char in key):
        raise ConfigError(
            f"{source} has a space, a control or a non-ASCII character; expected printable ASCII without spaces"
        )


def _digest(value: bytes) -> bytes:
    return hashlib.sha256(value).digest()


class ApiKeyAuth:
    """ASGI middleware: a request to anything but the page and the API reference gets a 401 (JSON ``detail``,
    ``WWW-Authenticate: Bearer``) unless it carries the key; the refusal comes before any body is read. The key
    has passed :func:`check_api_key`."""

    def __init__(self, app: ASGIApp, key: str) -> None:
        self.app = app
        self._digest = _digest(key.encode("ascii"))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        # lifespan passes; so would a websocket, but the app has no websocket route to reach
        if scope["type"] != "http" or path in PUBLIC_PATHS or path.startswith(PUBLIC_PREFIX):
            await self.app(scope, receive, send)
            return
        refusal = self._refusal(dict(scope.get("headers") or []).get(b"authorization"))
        if refusal is None:
            await self.app(scope, receive, send)
            return
        detail, challenge = refusal
        response = JSONResponse({"detail": detail}, status_code=401, headers={"WWW-Authenticate": challenge})
        await response(scope, receive, send)

    def _refusal(self, header: bytes | None) -> tuple[str, str] | None:
        """None for the right key, else the 401's (detail, WWW-Authenticate challenge)."""
        scheme, _, token = (header or b"").strip().partition(b" ")
        token = token.strip()
        if scheme.lower() != b"bearer" or not token:
            return MISSING, 'Bearer realm="dualtoken"'
        if not hmac.compare_digest(_digest(token), self._digest):
            return WRONG, 'Bearer realm="dualtoken", error="invalid_token"'
        return None


def declare_bearer(openapi: dict[str, Any]) -> None:
    """Declare the bearer scheme in an OpenAPI document, required by every operation (in place)."""
    openapi.setdefault("components", {})["securitySchemes"] = {
        SCHEME: {
            "type": "http",
            "scheme": "bearer",
            "description": "the server's API key (`dualtoken serve --api-key` or $" + ENV_VAR + ")",
        }
    }
    openapi["security"] = [{SCHEME: []}]
