"""What a training run watches besides the loss: codebook usage and held-out reconstructions."""

from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist

from ..evaluation.codebook_stats import code_histogram, usage_stats
from ..io import to_uint8
from ..visualize import hstack
from .engine import Callback, Engine


class CodebookMonitor(Callback):
    """Code counts per vocabulary and depth of every training forward (``update``), summed over processes and
    written as a ``codebook`` record every ``log.codebook_every`` steps and at the last: ``<vocabulary>/usage``,
    ``/dead_codes`` and ``/perplexity`` pooled over depths, ``<vocabulary>/depth<d>/usage`` and ``/perplexity``."""

    def __init__(self, sizes: dict[str, int], depths: dict[str, int], device: torch.device) -> None:
        self.sizes = sizes
        self.counts = {b: torch.zeros(depths[b], sizes[b], dtype=torch.long, device=device) for b in sizes}

    def update(self, branch: str, codes: torch.Tensor) -> None:
        """Add the codes (B, h, w, Q) of one forward."""
        self.counts[branch] += code_histogram(codes.detach(), self.sizes[branch])

    def summary(self) -> dict[str, float]:
        """The record's values over the counts so far; resets them."""
        values: dict[str, float] = {}
        for branch, counts in self.counts.items():
            if dist.is_available() and dist.is_initialized():
                dist.all_reduce(counts)
            pooled = usage_stats(counts.sum(dim=0).cpu())
            for name in ("usage", "dead_codes", "perplexity"):
                values[f"{branch}/{name}"] = pooled[name]
            for depth in range(counts.shape[0]):
                stats = usage_stats(counts[depth].cpu())
                values[f"{branch}/depth{depth}/usage"] = stats["usage"]
                values[f"{branch}/depth{depth}/perplexity"] = stats["perplexity"]
            counts.zero_()
        return values

    def on_step_end(self, engine: Engine, last: bool) -> None:
        if engine.step % engine.config.log.codebook_every == 0 or last:
            engine.logger.log(engine.step, self.summary(), kind="codebook")


def reconstruction_grid(originals: torch.Tensor, reconstructions: torch.Tensor, gap: int = 2) -> np.ndarray:
    """Originals (top row) over their reconstructions (bottom row) -> uint8 (2H + gap, n(W + gap) - gap, 3)."""
    top = hstack(list(to_uint8(originals)), gap)
    bottom = hstack(list(to_uint8(reconstructions)), gap)
    spacer = np.full((gap, top.shape[1], 3), 255, dtype=np.uint8)
    return np.concatenate([top, spacer, bottom], axis=0)
