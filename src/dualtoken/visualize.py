"""Pictures people would rather look at than read: side-by-side reconstructions and token maps."""

from __future__ import annotations

import numpy as np
import torch

from .io import to_uint8


def _palette(size: int, seed: int) -> np.ndarray:
    """A fixed random colour per code id, (size, 3) uint8; neighbouring ids get unrelated colours."""
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, size=(size, 3), dtype=np.uint8)


def token_map(codes: torch.Tensor, codebook_size: int, cell: int = 8, seed: int = 0) -> np.ndarray:
    """Codes (h, w) of one depth -> uint8 (h*cell, w*cell, 3): each position painted with its code's colour."""
    colours = _palette(codebook_size, seed)[codes.cpu().numpy()]  # (h, w, 3)
    return np.repeat(np.repeat(colours, cell, axis=0), cell, axis=1)


def token_maps(codes: torch.Tensor, codebook_size: int, cell: int = 8, gap: int = 2) -> np.ndarray:
    """Codes (h, w, Q) -> the Q depth maps in a row, uint8 (h*cell, Q*(w*cell+gap)-gap, 3)."""
    maps = [token_map(codes[..., q], codebook_size, cell) for q in range(codes.shape[-1])]
    return hstack(maps, gap)


def hstack(images: list[np.ndarray], gap: int = 4, fill: int = 255) -> np.ndarray:
    """uint8 (H_i, W_i, 3) images side by side on a white background, top-aligned."""
    height = max(i.shape[0] for i in images)
    width = sum(i.shape[1] for i in images) + gap * (len(images) - 1)
    canvas = np.full((height, width, 3), fill, dtype=np.uint8)
    x = 0
    for image in images:
        canvas[: image.shape[0], x : x + image.shape[1]] = image
        x += image.shape[1] + gap
    return canvas


def vstack(images: list[np.ndarray], gap: int = 4, fill: int = 255) -> np.ndarray:
    """uint8 images stacked vertically on a white background, left-aligned."""
    return np.ascontiguousarray(hstack([np.ascontiguousarray(i.transpose(1, 0, 2)) for i in images], gap, fill).transpose(1, 0, 2))


def side_by_side(original: torch.Tensor, reconstruction: torch.Tensor, gap: int = 4) -> np.ndarray:
    """Two (3, H, W) images in [-1, 1] -> one uint8 picture, original left."""
    return hstack([to_uint8(original), to_uint8(reconstruction)], gap)
