"""The PatchGAN-style discriminator of the release (docs/METHOD.md "Objective"): a map of real/fake logits per image patch.

    conv3x3 s2 (3 -> c0), LeakyReLU(0.2)
    DBlock(c0 -> c1, s2), DBlock(c1 -> c2, s2), DBlock(c2 -> c3, s1)
    conv3x3 s1 (c3 -> 1)                                              -> logits (B, 1, h', w')
    DBlock(x) = nin1x1(bilinear-resize(x to h's size)) + h,  h = conv3x3_stride(LeakyReLU(GN(x)))

Every conv weight (the nin convs included) starts ~ N(0, 0.02); biases and GroupNorms keep PyTorch's defaults.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .errors import ConfigError


@dataclass
class DiscriminatorConfig:
    """Channels of the stem and the three DBlocks, their strides, and the init / activation constants."""

    channels: tuple[int, int, int, int] = (64, 128, 256, 512)
    strides: tuple[int, int, int] = (2, 2, 1)
    norm_groups: int = 32
    leaky_slope: float = 0.2
    init_std: float = 0.02

    def __post_init__(self) -> None:
        bad = [c for c in self.channels[:-1] if c % self.norm_groups]
        if bad:
            raise ConfigError(
                f"discriminator channels {bad} are not multiples of norm_groups {self.norm_groups}"
            )


class DBlock(nn.Module):
    """A strided residual block: GroupNorm -> LeakyReLU -> conv3x3, plus a resized 1x1 shortcut."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, config: DiscriminatorConfig) -> None:
        super().__init__()
        self.norm = nn.GroupNorm(config.norm_groups, in_channels)
        self.conv = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1)
        self.nin = nn.Conv2d(in_channels, out_channels, 1)
        self.slope = config.leaky_slope

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv(F.leaky_relu(self.norm(x), self.slope))
        shortcut = F.interpolate(x, size=h.shape[-2:], mode="bilinear", align_corners=False)
        return self.nin(shortcut) + h


class PatchDiscriminator(nn.Module):
    """Images (B, 3, H, W) in [-1, 1] -> patch logits (B, 1, H/8, W/8) with the default strides."""

    def __init__(self, config: DiscriminatorConfig | None = None) -> None:
        super().__init__()
        self.config = config = config or DiscriminatorConfig()
        c = config.channels
        self.stem = nn.Conv2d(3, c[0], 3, stride=2, padding=1)
        self.blocks = nn.ModuleList(
            DBlock(c[i], c[i + 1], config.strides[i], config) for i in range(len(config.strides))
        )
        self.head = nn.Conv2d(c[-1], 1, 3, stride=1, padding=1)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Fresh weights: conv weights ~ N(0, init_std), PyTorch defaults for biases and norms."""
        for module in self.modules():
            if isinstance(module, (nn.Conv2d, nn.GroupNorm)):
                module.reset_parameters()
            if isinstance(module, nn.Conv2d):
                nn.init.normal_(module.weight, 0.0, self.config.init_std)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = F.leaky_relu(self.stem(images), self.config.leaky_slope)
        for block in self.blocks:
            x = block(x)
        return self.head(x)
