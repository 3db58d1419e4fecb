"""The tokenizer behind the HTTP API: preprocessing of uploads and the three batched model operations.

Each operation (encode, reconstruct, decode) has its own :class:`MicroBatcher`; they share one lock, so the model
runs one batch at a time. Everything here works on tensors and arrays; turning them into HTTP responses (PNG bytes,
JSON) is the app's job.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from io import BytesIO
from typing import Any

import numpy as np
import torch

from .. import metrics
from ..io import load_image, to_uint8
from ..meaning import Reading, build_reader
from ..visualize import embedding_maps, token_map
from .batcher import MicroBatcher
from .config import ServeConfig
from .limits import check_image_bytes

BRANCHES = ("pixel", "semantic")


@dataclass
class Reconstruction:
    """One image through the tokenizer: its codes, and its reconstruction from every depth prefix k = 1..Q."""

    original: np.ndarray  # (H, W, 3) uint8, the preprocessed input
    reconstructions: np.ndarray  # (Q, H, W, 3) uint8, prefix k at index k - 1
    psnr: list[float | None]  # (Q,) dB; None where the reconstruction is exact
    ssim: list[float]  # (Q,)
    codes: dict[str, torch.Tensor]  # branch -> (h, w, Q) long
    embedding_maps: dict[str, np.ndarray]  # branch -> (Q, h, w, 3) uint8, code embeddings summed to prefix k
    code_maps: dict[str, np.ndarray]  # branch -> (Q, h, w, 3) uint8, the code ids of depth d
    meaning: Reading | None  # the top classes from the semantic codes and unquantized; None without a classifier


class TokenizerService:
    """A DualTokenizer (eval mode, inference only) behind micro-batched encode / reconstruct / decode queues."""

    def __init__(self, tokenizer, config: ServeConfig, model_lock: threading.Lock | None = None) -> None:
        self.tokenizer = tokenizer.eval()
        self.config = config
        self.model_lock = model_lock or threading.Lock()
        self.reader, self.no_reader_reason = build_reader(self.tokenizer)
        self.encoder = self._batcher("encode", self._encode_batch)
        self.reconstructor = self._batcher("reconstruct", self._reconstruct_batch)
        self.decoder = self._batcher("decode", self._decode_batch)

    def _batcher(self, name: str, process: Callable[[list], Sequence]) -> MicroBatcher:
        cfg = self.config
        return MicroBatcher(
            name, process, cfg.max_batch, cfg.max_wait_ms / 1000.0, cfg.max_queue, self.model_lock
        )

    @property
    def batchers(self) -> list[MicroBatcher]:
        return [self.encoder, self.reconstructor, self.decoder]

    @property
    def name(self) -> str:
        return self.tokenizer.config.name

    def describe(self) -> dict[str, Any]:
        """The served model's shapes and vocabularies (GET /v1/models)."""
        tok = self.tokenizer
        return {
            "name": self.name,
            "base_model": tok.config.base_model,
            "image_size": list(tok.image_size),
            "grid": list(tok.grid),
            "pixel_depth": tok.pixel_depth,
            "semantic_depth": tok.semantic_depth,
            "codebook_size": {branch: tok.codebook_size(branch) for branch in BRANCHES},
            "meaning": self.reader.describe() if self.reader else {"unavailable": self.no_reader_reason},
        }

    def depth(self, branch: str) -> int:
        return self.tokenizer.pixel_depth if branch == "pixel" else self.tokenizer.semantic_depth

    def preprocess(self, data: bytes, size: tuple[int, int] | None = None) -> torch.Tensor:
        """Uploaded file bytes -> (3, H, W) in [-1, 1] at ``size`` (default: the tokenizer's); header checked
        before decoding."""
        check_image_bytes(data, self.config.max_image_pixels, self.config.allowed_formats)
        return load_image(BytesIO(data), size=tuple(size or self.tokenizer.image_size))

    def close(self) -> None:
        for batcher in self.batchers:
            batcher.close()

    @torch.inference_mode()
    def _encode_batch(self, images: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        tokens = self.tokenizer.encode(torch.stack(images))  # (B, h, w, Q) each
        return [{"pixel": tokens.pixel[i], "semantic": tokens.semantic[i]} for i in range(len(images))]

    @torch.inference_mode()
    def _reconstruct_batch(self, images: list[torch.Tensor]) -> list[Reconstruction]:
        tok = self.tokenizer
        batch = torch.stack(images)  # (B, 3, H, W)
        tokens = tok.encode(batch)
        codes = {"pixel": tokens.pixel, "semantic": tokens.semantic}  # (B, h, w, Q)
        decoded = [
            tok.decode(tokens.pixel[..., :k]) for k in range(1, tok.pixel_depth + 1)
        ]  # Q x (B, 3, H, W)
        psnr = torch.stack([metrics.psnr(image, batch) for image in decoded], dim=1)  # (B, Q)
        ssim = torch.stack([metrics.ssim(image, batch) for image in decoded], dim=1)  # (B, Q)
        per_prefix = np.stack([to_uint8(image) for image in decoded], axis=1)  # (B, Q, H, W, 3)
        originals = to_uint8(batch)  # (B, H, W, 3)
        embeddings = {
            b: tok.code_embeddings(codes[b], b, per_depth=True) for b in BRANCHES
        }  # (B, h, w, Q, D)
        readings = self.reader.read(batch, tokens.semantic) if self.reader else [None] * len(images)
        return [
            Reconstruction(
                original=originals[i],
                reconstructions=per_prefix[i],
                psnr=[value if math.isfinite(value) else None for value in psnr[i].tolist()],
                ssim=ssim[i].tolist(),
                codes={b: codes[b][i] for b in BRANCHES},
                embedding_maps={b: embedding_maps(embeddings[b][i]) for b in BRANCHES},
                code_maps={b: self._code_maps(codes[b][i], b) for b in BRANCHES},
                meaning=readings[i],
            )
            for i in range(len(images))
        ]

    def _code_maps(self, codes: torch.Tensor, branch: str) -> np.ndarray:
        """(h, w, Q) codes -> (Q, h, w, 3) uint8: each depth's code ids in the package's code palette."""
        size = self.tokenizer.codebook_size(branch)
        return np.stack([token_map(codes[..., d], size, cell=1) for d in range(codes.shape[-1])])

    @torch.inference_mode()
    def _decode_batch(self, items: list[tuple[torch.Tensor, int]]) -> list[np.ndarray]:
        """(codes (h, w, q), k) pairs -> uint8 (H, W, 3) images; one decoder call per distinct k."""
        results: list[np.ndarray | None] = [None] * len(items)
        for k in sorted({k for _, k in items}):
            indices = [i for i, (_, item_k) in enumerate(items) if item_k == k]
            codes = torch.stack([items[i][0][..., :k] for i in indices])  # (b, h, w, k)
            images = to_uint8(self.tokenizer.decode(codes))  # (b, H, W, 3)
            for row, index in enumerate(indices):
                results[index] = images[row]
        return results
