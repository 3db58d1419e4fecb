"""The LPIPS metric (Zhang et al. 2018) of the evaluation: :class:`dualtoken.perceptual.LPIPS`, the package's one
LPIPS (VGG16 or AlexNet trunk from a torchvision weights file, lpips v0.1 heads, by default torchmetrics' copy),
with torchmetrics' channel normalisation, per image and without gradients."""

from __future__ import annotations

from pathlib import Path

import torch

from ..perceptual import LPIPS as _LPIPS
from ..perceptual import alexnet_features, default_lpips_heads, vgg16_features

__all__ = ["LPIPS", "alexnet_features", "default_lin_weights", "vgg16_features"]

default_lin_weights = default_lpips_heads  # the lpips v0.1 heads torchmetrics ships for "vgg" or "alex"


class LPIPS(_LPIPS):
    """LPIPS distance per image pair: images (B, 3, H, W) in [-1, 1] -> (B,), without gradients."""

    def __init__(self, net: str, trunk_weights: str | Path, lin_weights: str | Path | None = None) -> None:
        super().__init__(net, trunk_weights, lin_weights, normalization="torchmetrics")

    @torch.no_grad()
    def forward(self, reconstruction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self.per_image(reconstruction, target)
