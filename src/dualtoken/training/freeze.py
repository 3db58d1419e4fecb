"""Freeze presets: which parts of the tokenizer train (see :class:`FreezeConfig`).

The tower is addressed by layer number: 0 is the embedding, 1..L the layers, and "head" what pools after them.
"""

from __future__ import annotations

from torch import nn

from ..errors import ConfigError
from .config import FreezeConfig


def frozen_modules(tokenizer, config: FreezeConfig) -> list[nn.Module]:
    """The modules a preset freezes, and the tower's tail after the semantic tap when ``config.tail`` is set."""
    parts = tokenizer.backbone.parts()
    tail = [parts[i] for i in range(tokenizer.config.semantic_layer + 1, tokenizer.backbone.num_layers + 1)]
    return _preset_modules(tokenizer, config, parts) + (tail + [parts["head"]] if config.tail else [])


def _preset_modules(tokenizer, config: FreezeConfig, parts: dict) -> list[nn.Module]:
    cfg = tokenizer.config
    if config.preset == "stage1":
        return []
    if config.preset == "stage0":
        return [parts[i] for i in range(0, cfg.semantic_layer + 1)]
    if config.preset == "stage2":
        last = cfg.shortcut_layer if cfg.shortcut_layer is not None else cfg.pixel_layer
        pixel = [tokenizer.pixel.down, tokenizer.pixel.up, tokenizer.decoder, tokenizer.pixel_shortcut]
        return [parts[i] for i in range(0, last + 1)] + [m for m in pixel if m is not None]
    if config.preset == "finetune":
        first_trained = tokenizer.backbone.num_layers - config.finetune_last_layers + 1
        return [parts[i] for i in range(0, max(first_trained, 1))]
    raise ConfigError(f"unknown freeze preset {config.preset!r}")


def apply_freeze(tokenizer, config: FreezeConfig) -> list[str]:
    """Set ``requires_grad`` by preset (everything else trains); returns the names of the frozen parameters."""
    tokenizer.requires_grad_(True)
    for module in frozen_modules(tokenizer, config):
        module.requires_grad_(False)
    return [name for name, p in tokenizer.named_parameters() if not p.requires_grad]


def set_train_mode(tokenizer, config: FreezeConfig) -> None:
    """Training mode, except the pixel quantizer under ``stage2`` (its codebook stops updating); a
    single-vocabulary model has no pixel quantizer of its own."""
    tokenizer.train()
    if config.preset == "stage2" and tokenizer.pixel.quantizer is not None:
        tokenizer.pixel.quantizer.eval()
