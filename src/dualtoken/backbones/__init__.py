"""Backbone families behind one contract (:class:`Backbone`), chosen by the config's ``kind``."""

from __future__ import annotations

from .base import Backbone
from .efficientnet import EfficientNetBackbone
from .siglip import SiglipBackbone

BACKBONES: dict[str, type[Backbone]] = {"siglip": SiglipBackbone, "efficientnet_lite0": EfficientNetBackbone}


def backbone_class(kind: str) -> type[Backbone]:
    from ..errors import ConfigError

    if kind not in BACKBONES:
        raise ConfigError(f"unknown backbone kind {kind!r}; known: {sorted(BACKBONES)}")
    return BACKBONES[kind]


__all__ = ["Backbone", "SiglipBackbone", "EfficientNetBackbone", "BACKBONES", "backbone_class"]
