"""Pictures the page shows: PNG bytes and data URLs, and token grids coloured by their code embeddings."""

from __future__ import annotations

import base64
from io import BytesIO

import numpy as np
import torch
from PIL import Image


def png_bytes(pixels: np.ndarray) -> bytes:
    """uint8 (H, W, 3) -> PNG file bytes."""
    buffer = BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def png_data_url(pixels: np.ndarray) -> str:
    """uint8 (H, W, 3) -> a ``data:image/png;base64,...`` URL, ready for an <img> element."""
    return "data:image/png;base64," + base64.b64encode(png_bytes(pixels)).decode("ascii")


def embedding_maps(embeddings: torch.Tensor) -> np.ndarray:
    """Colour pictures of a token grid at every depth prefix: (h, w, Q, D) per-depth code embeddings -> (Q, h, w, 3).

    Prefix k is the sum of the first k depths' embeddings (what the quantizer has reconstructed after k codes).
    Colours are the three leading principal components of the full-depth embeddings, with one basis and one
    scale for every prefix, so that the maps of different k are comparable and similar tokens look alike.
    """
    h, w, depth, dim = embeddings.shape
    prefixes = embeddings.float().cumsum(dim=2).permute(2, 0, 1, 3).reshape(depth, h * w, dim)  # (Q, hw, D)
    full = prefixes[-1]
    mean = full.mean(dim=0, keepdim=True)  # (1, D)
    _, _, vh = torch.linalg.svd(full - mean, full_matrices=False)  # vh (min(hw, D), D)
    basis = vh[:3].t()  # (D, <=3)
    # a deterministic sign per component: its largest loading is positive
    signs = torch.sign(basis.gather(0, basis.abs().argmax(dim=0, keepdim=True)))
    basis = basis * torch.where(signs == 0, torch.ones_like(signs), signs)
    if basis.shape[1] < 3:
        basis = torch.cat([basis, basis.new_zeros(dim, 3 - basis.shape[1])], dim=1)
    projected = (prefixes - mean) @ basis  # (Q, hw, 3)
    low = (full - mean) @ basis
    low, high = low.amin(dim=0), low.amax(dim=0)  # (3,)
    scaled = (projected - low) / (high - low).clamp_min(1e-8)
    pixels = (scaled.clamp(0, 1) * 255).round().to(torch.uint8)
    return pixels.reshape(depth, h, w, 3).numpy()
