"""One pass of EfficientNet-Lite0 giving both what the perceptual distance needs (multi-level maps) and what the
Fréchet distance and KID need (the pooled 1280-d head features), and the perceptual distance itself."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..features import EfficientNetFeatures
from ..perceptual import level_distance as map_distance


@dataclass
class FeatureOutput:
    levels: list[torch.Tensor]  # 5 maps, strides 2..32
    pooled: torch.Tensor  # (B, 1280)


class FeatureNet(nn.Module):
    """Frozen EfficientNet-Lite0; ``forward`` returns :class:`FeatureOutput` from a single trunk pass.

    ``pooled`` equals ``EfficientNetFeatures.forward`` (the head conv on the last level, averaged over space).
    """

    name = "efficientnet_lite0"

    def __init__(self, resize: int, pretrained: bool = True) -> None:
        super().__init__()
        self.extractor = EfficientNetFeatures(resize=resize, pretrained=pretrained)
        self.feature_dim = self.extractor.feature_dim

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> FeatureOutput:
        levels = self.extractor.levels(images)
        net = self.extractor.net
        head = net._swish(net._bn1(net._conv_head(levels[-1])))  # (B, 1280, h, w)
        return FeatureOutput(levels=levels, pooled=head.mean(dim=(2, 3)))


def level_distance(levels_a: list[torch.Tensor], levels_b: list[torch.Tensor]) -> torch.Tensor:
    """The perceptual distance per image pair: LPIPS's recipe without learned weights (the training loss's
    per-level distance, in float64), summed over levels. (B,)"""
    pairs = zip(levels_a, levels_b, strict=True)
    return sum(map_distance(a.double(), b.double()) for a, b in pairs).float()


class PrecomputedFeatures(nn.Module):
    """The identity, standing in for torchmetrics' feature extractor: features are computed once by
    :class:`FeatureNet` and shared by FD, KID and the perceptual distance instead of three network passes."""

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.num_features = num_features

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features
