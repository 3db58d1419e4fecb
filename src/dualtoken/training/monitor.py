"""What a training run watches besides the loss: codebook usage, held-out reconstructions, throughput, memory."""

from __future__ import annotations

import resource
import sys

import numpy as np
import torch
import torch.distributed as dist

from ..evaluation.codebook_stats import code_histogram, usage_stats
from ..io import to_uint8
from ..visualize import hstack


class CodebookUsage:
    """Code counts per vocabulary and depth over a window of steps (summed over processes when read)."""

    def __init__(self, sizes: dict[str, int], depths: dict[str, int], device: torch.device) -> None:
        self.sizes = sizes
        self.counts = {b: torch.zeros(depths[b], sizes[b], dtype=torch.long, device=device) for b in sizes}

    def update(self, branch: str, codes: torch.Tensor) -> None:
        """Add the codes (B, h, w, Q) of one forward."""
        self.counts[branch] += code_histogram(codes.detach(), self.sizes[branch])

    def summary(self) -> dict[str, float]:
        """Usage (fraction of K used), dead codes and perplexity per vocabulary, pooled and per depth; resets."""
        values: dict[str, float] = {}
        for branch, counts in self.counts.items():
            if dist.is_available() and dist.is_initialized():
                dist.all_reduce(counts)
            pooled = usage_stats(counts.sum(dim=0).cpu())
            values[f"{branch}/usage"] = pooled["usage"]
            values[f"{branch}/dead_codes"] = pooled["dead_codes"]
            values[f"{branch}/perplexity"] = pooled["perplexity"]
            for depth in range(counts.shape[0]):
                stats = usage_stats(counts[depth].cpu())
                values[f"{branch}/depth{depth}/usage"] = stats["usage"]
                values[f"{branch}/depth{depth}/perplexity"] = stats["perplexity"]
            counts.zero_()
        return values


def reconstruction_grid(originals: torch.Tensor, reconstructions: torch.Tensor, gap: int = 2) -> np.ndarray:
    """Originals (top row) over their reconstructions (bottom row) -> uint8 (2H + gap, n(W + gap) - gap, 3)."""
    top = hstack(list(to_uint8(originals)), gap)
    bottom = hstack(list(to_uint8(reconstructions)), gap)
    spacer = np.full((gap, top.shape[1], 3), 255, dtype=np.uint8)
    return np.concatenate([top, spacer, bottom], axis=0)


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory of this process so far: CUDA allocations on a GPU, resident set size on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10
