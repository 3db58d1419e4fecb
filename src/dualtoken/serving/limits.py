"""Request limits: a body-size cap enforced while the body streams in, and a guarded reader for uploaded images.

Uploads are read from memory only: neither a file name nor any other request field is ever used as a path.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterable
from io import BytesIO

from PIL import Image, UnidentifiedImageError

from ..errors import ImageError
from ..io import empty_file_error


class ImageTooLargeError(ImageError):
    """An uploaded image has more pixels than the server accepts (decompression-bomb guard): HTTP 413."""


def check_image_bytes(data: bytes, max_pixels: int, formats: Iterable[str]) -> tuple[str, tuple[int, int]]:
    """Identify an uploaded image from its header, before any pixel is decoded; returns (format, (width, height)).

    Raises ImageError for empty, unreadable or disallowed files and ImageTooLargeError when width * height exceeds
    ``max_pixels``.
    """
    allowed = [name.upper() for name in formats]
    if not data:
        raise empty_file_error("upload", ", ".join(allowed))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(BytesIO(data), formats=allowed) as image:
                fmt, size = image.format or "?", image.size
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageTooLargeError(f"the image is too large to decode safely: {exc}") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError) as exc:
        raise ImageError(
            f"the upload is not a readable image ({type(exc).__name__}); expected one of: {', '.join(allowed)}"
        ) from None
    width, height = size
    if width * height > max_pixels:
        raise ImageTooLargeError(
            f"the image is {width}x{height} = {width * height} pixels; the server accepts at most {max_pixels}"
        )
    return fmt, size


class BodySizeLimit:
    """ASGI middleware: answer 413 to any HTTP request whose body exceeds ``max_bytes``.

    A declared Content-Length over the limit is refused before reading; a streamed body is counted as it arrives
    and the request is refused as soon as it passes the limit, so an oversized upload never reaches the handler.
    """

    def __init__(self, app, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self._refuse(send)
            return
        state = {"received": 0, "exceeded": False, "started": False}

        async def limited_receive():
            message = await receive()
            if message["type"] == "http.request":
                state["received"] += len(message.get("body", b""))
                if state["received"] > self.max_bytes:
                    state["exceeded"] = True
                    raise _BodyTooLarge
            return message

        async def guarded_send(message):
            if state["exceeded"]:
                return  # the handler's answer to a truncated body is replaced by the 413
            if message["type"] == "http.response.start":
                state["started"] = True
            await send(message)

        try:
            await self.app(scope, limited_receive, guarded_send)
        except Exception:
            if not state["exceeded"]:
                raise
        if state["exceeded"] and not state["started"]:
            await self._refuse(send)

    async def _refuse(self, send) -> None:
        body = json.dumps({"detail": f"request body too large: the limit is {self.max_bytes} bytes"}).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": 413, "headers": headers})
        await send({"type": "http.response.body", "body": body})


class _BodyTooLarge(Exception):
    """Raised inside the app's receive() once the body passes the limit; caught by BodySizeLimit."""
