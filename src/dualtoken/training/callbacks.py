"""Callbacks that more than one task adds to the engine: code-usage records, and the periodic copy of a run's newest
checkpoint elsewhere is left to recipes (see recipes/efflite0/device_pixel.py)."""

from __future__ import annotations

import torch

from .engine import Callback, Engine
from .monitor import CodebookUsage


class CodebookMonitor(Callback):
    """Counts the codes of every training forward (``update``) and writes a ``codebook`` record every
    ``log.codebook_every`` steps and at the last: ``<vocabulary>/usage``, ``/dead_codes``, ``/perplexity`` pooled
    over depths, and ``<vocabulary>/depth<d>/usage`` and ``/perplexity`` per depth (d from 0)."""

    def __init__(self, sizes: dict[str, int], depths: dict[str, int], device: torch.device) -> None:
        self.usage = CodebookUsage(sizes, depths, device)

    def update(self, vocabulary: str, codes: torch.Tensor) -> None:
        """Add one forward's codes (B, h, w, Q) or (B, h*w, Q)."""
        self.usage.update(vocabulary, codes)

    def on_step_end(self, engine: Engine, last: bool) -> None:
        if engine.step % engine.config.log.codebook_every == 0 or last:
            engine.logger.log(engine.step, self.usage.summary(), kind="codebook")
