"""One pass of EfficientNet-Lite0 giving both what the perceptual distance needs (multi-level maps) and what the
Fréchet distance and KID need (the pooled 1280-d head features), and the perceptual distance itself."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..features import EfficientNetFeatures


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


def _unit_channels(features: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    return features / (features.pow(2).sum(dim=1, keepdim=True).sqrt() + eps)


def level_distance(levels_a: list[torch.Tensor], levels_b: list[torch.Tensor]) -> torch.Tensor:
    """The perceptual distance per image pair: LPIPS's recipe without learned weights. Per level, channels are
    normalised to unit length, the squared difference is summed over channels and averaged over positions; the
    levels are summed. (B,)"""
    total = torch.zeros(levels_a[0].shape[0], dtype=torch.float64, device=levels_a[0].device)
    for a, b in zip(levels_a, levels_b, strict=True):
        diff = (_unit_channels(a.double()) - _unit_channels(b.double())).pow(2).sum(dim=1)  # (B, h, w)
        total = total + diff.mean(dim=(1, 2))
    return total.float()


class PrecomputedFeatures(nn.Module):
    """The identity, standing in for torchmetrics' feature extractor: features are computed once by
    :class:`FeatureNet` and shared by FD, KID and the perceptual distance instead of three network passes."""

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.num_features = num_features

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features
