"""Chat and text-to-image behind the API: the small protocol the server needs from an MLLM, and its queues.

The server depends on nothing of ``dualtoken.mllm`` but this protocol, so any object with these two methods can be
served (the tests use a fake).
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np
import torch

from ..io import to_uint8
from .batcher import MicroBatcher
from .config import ServeConfig


@runtime_checkable
class MultimodalModel(Protocol):
    """What ``/v1/chat`` and ``/v1/generate`` call."""

    @property
    def image_size(self) -> tuple[int, int]:
        """(H, W): the size uploaded chat images are resized and centre-cropped to."""
        ...

    def chat(self, image: torch.Tensor, question: str) -> str:
        """Answer ``question`` about ``image`` ((3, H, W) in [-1, 1] at ``image_size``)."""
        ...

    def generate(self, prompt: str, cfg_scale: float, seed: int) -> torch.Tensor:
        """An image for ``prompt``: (3, H, W) or (1, 3, H, W), [-1, 1] scale; deterministic for a given seed."""
        ...


class MllmService:
    """Chat and generate requests, one model call at a time (autoregressive calls gain little from batching),
    each kind behind its own bounded queue and the tokenizer's model lock."""

    def __init__(self, model: MultimodalModel, config: ServeConfig, model_lock: threading.Lock) -> None:
        self.model = model
        wait_s = config.max_wait_ms / 1000.0
        self.chatter = MicroBatcher("chat", self._chat_batch, 1, wait_s, config.max_queue, model_lock)
        self.generator = MicroBatcher(
            "generate", self._generate_batch, 1, wait_s, config.max_queue, model_lock
        )

    @property
    def batchers(self) -> list[MicroBatcher]:
        return [self.chatter, self.generator]

    def close(self) -> None:
        for batcher in self.batchers:
            batcher.close()

    @torch.inference_mode()
    def _chat_batch(self, items: list[tuple[torch.Tensor, str]]) -> list[str]:
        return [str(self.model.chat(image, question)) for image, question in items]

    @torch.inference_mode()
    def _generate_batch(self, items: list[tuple[str, float, int]]) -> list[np.ndarray]:
        """(prompt, cfg_scale, seed) -> uint8 (H, W, 3) images."""
        images = []
        for prompt, cfg_scale, seed in items:
            image = self.model.generate(prompt, cfg_scale, seed)
            if image.dim() == 4 and image.shape[0] == 1:
                image = image[0]
            if image.dim() != 3 or image.shape[0] != 3:
                raise RuntimeError(
                    f"the MLLM returned an image of shape {tuple(image.shape)}; expected (3, H, W)"
                )
            images.append(to_uint8(image.float().cpu()))
        return images


def load_mllm(name_or_path: str | Path) -> MultimodalModel:
    """An embedded MLLM's name or a DualTokenMLLM folder (``save_pretrained`` format) for ``--mllm``; chat uploads
    are preprocessed to its own input size, which may differ from the served tokenizer's."""
    from ..mllm.model import DualTokenMLLM

    return DualTokenMLLM.from_pretrained(name_or_path)
