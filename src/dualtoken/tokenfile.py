"""Token files: both code tensors of a set of images and their ids, in one safetensors file.

Layout: tensors ``pixel`` and ``semantic`` (N, h, w, Q), int16 when the codebook fits, else int32; metadata
``ids`` (JSON list of N strings), ``model`` (config name), ``codebook_size`` (JSON [pixel, semantic]) and, when
known, ``source``: what the model was loaded from (a trained name, a folder, a Hub repo id), so that ``decode``
finds it again.
A sharded data set is a folder of such files; :func:`load_tokens` reads one file, :func:`iter_token_files` a folder.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file

from .errors import DataError
from .io import replace_with_default_mode


@dataclass
class TokenFile:
    pixel: torch.Tensor  # (N, h, w, Qp) int64
    semantic: torch.Tensor  # (N, h, w, Qs) int64
    ids: list[str]
    model: str
    codebook_size: tuple[int, int]
    source: str | None = None


def _storage_dtype(codebook_size: int) -> torch.dtype:
    return torch.int16 if codebook_size <= 32767 else torch.int32


def save_tokens(
    path: str | Path,
    pixel: torch.Tensor,
    semantic: torch.Tensor,
    ids: list[str],
    model: str,
    codebook_size: tuple[int, int],
    source: str | None = None,
) -> Path:
    """Write a token file atomically (temp file + rename)."""
    if pixel.shape[0] != semantic.shape[0] or pixel.shape[0] != len(ids):
        raise DataError(f"token file: {pixel.shape[0]} pixel, {semantic.shape[0]} semantic rows and {len(ids)} ids")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {
        "pixel": pixel.to(_storage_dtype(codebook_size[0])).contiguous().cpu(),
        "semantic": semantic.to(_storage_dtype(codebook_size[1])).contiguous().cpu(),
    }
    metadata = {"ids": json.dumps(list(ids)), "model": model, "codebook_size": json.dumps(list(codebook_size))}
    if source is not None:
        metadata["source"] = source
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    save_file(tensors, str(tmp), metadata=metadata)
    return replace_with_default_mode(tmp, path)


def load_tokens(path: str | Path) -> TokenFile:
    """Read a token file written by :func:`save_tokens`; a malformed file raises DataError."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"token file not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
        tensors = load_file(str(path))
        ids = json.loads(metadata["ids"])
        sizes = tuple(json.loads(metadata["codebook_size"]))
        model = metadata["model"]
        pixel, semantic = tensors["pixel"].long(), tensors["semantic"].long()
    except (SafetensorError, KeyError, json.JSONDecodeError, OSError) as exc:
        raise DataError(f"{path} is not a DualToken token file ({type(exc).__name__}: {exc})") from None
    return TokenFile(pixel, semantic, ids, model, sizes, metadata.get("source"))


def iter_token_files(folder: str | Path) -> Iterator[TokenFile]:
    """Every ``*.safetensors`` token file of a folder, in name order."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"token folder not found: {folder}")
    for path in sorted(folder.glob("*.safetensors")):
        yield load_tokens(path)
