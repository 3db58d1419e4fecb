"""Pictures the page shows, as PNG bytes and data URLs."""

from __future__ import annotations

import base64
import functools

import numpy as np

from ..io import png_bytes, sample_photos


@functools.cache
def sample_png(name: str) -> bytes:
    """The sample photo ``name`` (of :data:`dualtoken.io.SAMPLE_PHOTOS`) as PNG bytes, encoded once per process."""
    return png_bytes(dict(sample_photos())[name])


def png_data_url(pixels: np.ndarray) -> str:
    """uint8 (H, W, 3) -> a ``data:image/png;base64,...`` URL, ready for an <img> element."""
    return "data:image/png;base64," + base64.b64encode(png_bytes(pixels)).decode("ascii")
