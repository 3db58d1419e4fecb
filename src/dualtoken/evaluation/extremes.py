"""The best and worst reconstructions of a run (by PSNR), kept as uint8 pictures for the report's grid."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..io import to_uint8
from .distributed import gather_objects


@dataclass
class Example:
    score: float
    index: int
    id: str
    original: np.ndarray  # (H, W, 3) uint8
    reconstruction: np.ndarray  # (H, W, 3) uint8


class ExtremeImages:
    """Keeps the ``count`` highest- and lowest-scoring images seen (ties broken by data index)."""

    def __init__(self, count: int) -> None:
        self.count = count
        self.best: list[Example] = []
        self.worst: list[Example] = []

    def _trim(self) -> None:
        self.best = sorted(self.best, key=lambda e: (-e.score, e.index))[: self.count]
        self.worst = sorted(self.worst, key=lambda e: (e.score, e.index))[: self.count]

    def offer(
        self, scores: torch.Tensor, indices: torch.Tensor, ids: list[str], originals: torch.Tensor,
        reconstructions: torch.Tensor,
    ) -> None:
        if self.count == 0:
            return
        order = torch.argsort(scores)
        picks = set(order[: self.count].tolist()) | set(order[-self.count :].tolist())
        for i in sorted(picks):
            example = Example(
                float(scores[i]), int(indices[i]), ids[i], to_uint8(originals[i]), to_uint8(reconstructions[i])
            )
            self.best.append(example)
            self.worst.append(example)
        self._trim()

    def gathered(self) -> tuple[list[Example], list[Example]]:
        """(best, worst) over all processes, each image in one of them only.

        With fewer than 2 x ``count`` images the two lists would overlap: the images are then split, the better
        half (rounded up) as best and the rest as worst.
        """
        merged = ExtremeImages(self.count)
        for best, worst in gather_objects((self.best, self.worst)):
            merged.best += best
            merged.worst += worst
        merged._trim()
        candidates = {e.index: e for e in merged.best + merged.worst}
        if len(candidates) >= 2 * self.count:
            return merged.best, merged.worst
        ranked = sorted(candidates.values(), key=lambda e: (-e.score, e.index))
        half = (len(ranked) + 1) // 2
        return ranked[:half], sorted(ranked[half:], key=lambda e: (e.score, e.index))
