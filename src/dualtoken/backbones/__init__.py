"""Backbone families behind one contract (:class:`Backbone`), chosen by the config's ``kind``.

To add a family: write a module with its config dataclass (a :class:`BackboneConfig`) and its :class:`Backbone`
decorated with ``@register_backbone("kind", ConfigClass)``, and import the module here.
"""

from __future__ import annotations

from .base import BACKBONES, Backbone, BackboneConfig, backbone_class, register_backbone
from .efficientnet import EfficientNetBackbone, EfficientNetBackboneConfig
from .siglip import SiglipBackbone, SiglipBackboneConfig

__all__ = [
    "Backbone",
    "BackboneConfig",
    "SiglipBackbone",
    "SiglipBackboneConfig",
    "EfficientNetBackbone",
    "EfficientNetBackboneConfig",
    "BACKBONES",
    "backbone_class",
    "register_backbone",
]
