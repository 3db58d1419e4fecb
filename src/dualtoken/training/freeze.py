"""Freeze presets: which parts of the tokenizer train (see :class:`FreezeConfig`).

The tower is addressed by layer number: 0 is the embedding, 1..L the layers, and "head" what pools after them.
"""

from __future__ import annotations

from torch import nn

from ..errors import ConfigError
from .config import FreezeConfig


def tail_modules(tokenizer) -> list[nn.Module]:
    """The tower's layers after the semantic tap and its head: what turns semantic tokens into a pooled output."""
    parts = tokenizer.backbone.parts()
    layers = range(tokenizer.config.semantic_layer + 1, tokenizer.backbone.num_layers + 1)
    return [parts[i] for i in layers] + [parts["head"]]


def tail_lr_scales(tokenizer, config: FreezeConfig) -> list[tuple[nn.Module, float]]:
    """The optimiser's learning-rate scales: the tail's ``config.tail_lr_scale`` (none when it is 1)."""
    if config.tail_lr_scale == 1.0:
        return []
    return [(module, config.tail_lr_scale) for module in tail_modules(tokenizer)]


def frozen_modules(tokenizer, config: FreezeConfig) -> list[nn.Module]:
    """The modules a preset freezes, and the tower's tail after the semantic tap when ``config.tail`` is set."""
    parts = tokenizer.backbone.parts()
    return _preset_modules(tokenizer, config, parts) + (tail_modules(tokenizer) if config.tail else [])


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


def freeze_outside_pixel_branch(tokenizer) -> list[str]:
    """Freeze everything but the pixel path after the tap (``branch: "pixel"``): the down- and up-projections,
    the shortcut projection and the decoder train (a single vocabulary's down-projection is the semantic
    branch's); returns the names of the frozen parameters."""
    tokenizer.requires_grad_(False)
    down = tokenizer.semantic.down if tokenizer.pixel.down is None else None
    for module in (tokenizer.pixel, tokenizer.pixel_shortcut, tokenizer.decoder, down):
        if module is not None:
            module.requires_grad_(True)
    return [name for name, p in tokenizer.named_parameters() if not p.requires_grad]


def set_train_mode(tokenizer, config: FreezeConfig) -> None:
    """Training mode, except the pixel quantizer under ``stage2`` (its codebook stops updating); a
    single-vocabulary model has no pixel quantizer of its own."""
    tokenizer.train()
    if config.preset == "stage2" and tokenizer.pixel.quantizer is not None:
        tokenizer.pixel.quantizer.eval()
