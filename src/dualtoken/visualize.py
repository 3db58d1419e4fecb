"""Pictures people would rather look at than read: side-by-side reconstructions and token maps."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from .io import to_uint8


def _palette(size: int, seed: int) -> np.ndarray:
    """A fixed random colour per code id, (size, 3) uint8; neighbouring ids get unrelated colours."""
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, size=(size, 3), dtype=np.uint8)


def token_map(codes: torch.Tensor, codebook_size: int, cell: int = 8, seed: int = 0) -> np.ndarray:
    """Codes (h, w) of one depth -> uint8 (h*cell, w*cell, 3): each position painted with its code's colour."""
    colours = _palette(codebook_size, seed)[codes.cpu().numpy()]  # (h, w, 3)
    return np.repeat(np.repeat(colours, cell, axis=0), cell, axis=1)


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


def labelled_grid(
    cells: list[list[np.ndarray]], row_labels: list[str], column_labels: list[str], footer: str = "",
    gap: int = 6, font_size: int = 14,
) -> np.ndarray:
    """uint8 pictures in rows and columns on white, a label left of each row, above each column, a footer below."""
    font = ImageFont.load_default(size=font_size)
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))

    def text_width(text: str) -> int:
        return int(measure.textlength(text, font=font))

    cell_h = max(cell.shape[0] for row in cells for cell in row)
    cell_w = max(cell.shape[1] for row in cells for cell in row)
    cell_w = max(cell_w, *(text_width(label) for label in column_labels))
    label_w = max(text_width(label) for label in row_labels) + 2 * gap
    header_h = font_size + 2 * gap
    footer_h = font_size + 2 * gap if footer else 0
    columns = max(len(row) for row in cells)
    width = max(label_w + columns * (cell_w + gap) + gap, text_width(footer) + 2 * gap)
    height = header_h + len(cells) * (cell_h + gap) + footer_h
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    for c, label in enumerate(column_labels):
        x = label_w + c * (cell_w + gap) + (cell_w - text_width(label)) // 2
        draw.text((x, gap), label, fill=(40, 40, 40), font=font)
    for r, (row, label) in enumerate(zip(cells, row_labels)):
        y = header_h + r * (cell_h + gap)
        draw.text((gap, y + (cell_h - font_size) // 2), label, fill=(40, 40, 40), font=font)
        for c, cell in enumerate(row):
            canvas.paste(Image.fromarray(cell), (label_w + c * (cell_w + gap) + (cell_w - cell.shape[1]) // 2, y))
    if footer:
        draw.text((gap, height - footer_h + gap // 2), footer, fill=(110, 110, 110), font=font)
    return np.asarray(canvas)


def token_figure(tokenizer, pixel_codes: torch.Tensor, semantic_codes: torch.Tensor, cell: int = 8) -> np.ndarray:
    """One image's codes (h, w, Q) of both vocabularies -> a labelled picture, uint8 (H, W, 3).

    Columns are the depths k = 1..Q. For each vocabulary, one row shows the code ids of depth k (a fixed random
    colour per code id) and one the code vectors summed over depths 1..k, coloured by their principal components.
    """
    rows, labels = [], []
    for branch, codes in (("pixel", pixel_codes), ("semantic", semantic_codes)):
        size = tokenizer.codebook_size(branch)
        ids = [token_map(codes[..., d], size, cell) for d in range(codes.shape[-1])]
        sums = embedding_maps(tokenizer.code_embeddings(codes[None], branch)[0])  # (Q, h, w, 3)
        rows += [ids, [np.repeat(np.repeat(m, cell, axis=0), cell, axis=1) for m in sums]]
        labels += [f"{branch}: code ids of depth k", f"{branch}: sum of depths 1..k"]
    depth = max(len(row) for row in rows)
    return labelled_grid(
        rows, labels, [f"k = {k}" for k in range(1, depth + 1)],
        footer="each square is one image position; ids: one colour per code; sums: 3 principal components",
    )


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
