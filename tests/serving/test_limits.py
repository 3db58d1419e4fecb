"""Upload guards: image headers are checked before decoding, and bodies over the limit never reach a handler."""

from __future__ import annotations

import struct
import zlib
from io import BytesIO

import numpy as np
import pytest
from fastapi import FastAPI, Request
from fastapi.testclient import TestClient
from PIL import Image

from dualtoken.errors import ImageError
from dualtoken.serving.limits import BodySizeLimit, ImageTooLargeError, check_image_bytes

from .conftest import encode_image

FORMATS = ("PNG", "JPEG")


def png_header_only(width: int, height: int) -> bytes:
    """A PNG declaring width x height with no pixel data: what a decompression bomb looks like to a header check."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b"")


def test_a_valid_image_is_identified():
    data = encode_image(np.zeros((30, 40, 3), np.uint8), "JPEG")
    assert check_image_bytes(data, 10_000, FORMATS) == ("JPEG", (40, 30))


@pytest.mark.parametrize(
    "data, message",
    [
        (b"", r"^upload: empty file \(0 bytes\); expected an image file \(PNG, JPEG\)$"),
        (b"not an image at all", "not a readable image"),
        (
            encode_image(np.zeros((8, 8, 3), np.uint8), "BMP"),
            "not a readable image",
        ),  # BMP is not allowed here
    ],
)
def test_unusable_uploads_raise_image_error(data, message):
    with pytest.raises(ImageError, match=message):
        check_image_bytes(data, 10_000, FORMATS)


def test_more_pixels_than_allowed_is_refused_from_the_header():
    data = encode_image(np.zeros((101, 100, 3), np.uint8))
    with pytest.raises(ImageTooLargeError, match="101 = 10100 pixels"):
        check_image_bytes(data, 10_000, FORMATS)


def test_a_decompression_bomb_is_refused_without_decoding():
    bomb = png_header_only(200_000, 200_000)  # 40 gigapixels declared in 45 bytes
    assert len(bomb) < 100
    with pytest.raises(ImageTooLargeError):
        check_image_bytes(bomb, 10**12, FORMATS)  # PIL's own guard fires even when ours would allow it
    with pytest.raises(ImageTooLargeError, match="at most 1000000"):
        check_image_bytes(png_header_only(5000, 5000), 1_000_000, FORMATS)


def test_a_small_file_of_many_pixels_is_a_bomb_too():
    data = encode_image(np.zeros((3000, 3000), bool))  # 9 Mpixel 1-bit PNG, a few KB
    assert len(data) < 20_000
    with pytest.raises(ImageTooLargeError):
        check_image_bytes(data, 4_000_000, FORMATS)
    assert Image.open(BytesIO(data)).size == (3000, 3000)


def _echo_app(limit: int) -> TestClient:
    app = FastAPI()

    @app.post("/echo")
    async def echo(request: Request) -> dict:
        return {"size": len(await request.body())}

    app.add_middleware(BodySizeLimit, max_bytes=limit)
    return TestClient(app)


def test_body_limit_by_content_length_and_by_stream():
    client = _echo_app(1000)
    assert client.post("/echo", content=b"x" * 1000).json() == {"size": 1000}
    refused = client.post("/echo", content=b"x" * 1001)
    assert refused.status_code == 413 and "1000 bytes" in refused.json()["detail"]

    def chunks():  # no Content-Length: the body streams in and is counted as it arrives
        for _ in range(5):
            yield b"y" * 300

    streamed = client.post("/echo", content=chunks())
    assert streamed.status_code == 413
    assert client.post("/echo", content=iter([b"z" * 500])).json() == {"size": 500}
