"""Discriminator, optimiser groups and schedule, freeze presets, config round trip."""

from __future__ import annotations

import json

import pytest
import torch

from dualtoken.config import from_dict, to_dict
from dualtoken.discriminator import DiscriminatorConfig, PatchDiscriminator
from dualtoken.errors import ConfigError
from dualtoken.training import FreezeConfig, OptimizerConfig, TrainConfig, load_train_config
from dualtoken.training.freeze import apply_freeze, set_train_mode, tail_lr_scales, tail_modules
from dualtoken.training.optim import build_optimizer, lr_factor, parameter_groups


def test_discriminator_shape_and_init():
    disc = PatchDiscriminator()
    logits = disc(torch.zeros(1, 3, 64, 64))
    assert logits.shape == (1, 1, 8, 8)  # strides 2, 2, 2, 1
    weights = torch.cat(
        [m.weight.detach().flatten() for m in disc.modules() if isinstance(m, torch.nn.Conv2d)]
    )
    assert float(weights.std()) == pytest.approx(0.02, rel=0.05)
    with pytest.raises(ConfigError):
        DiscriminatorConfig(channels=(48, 64, 64, 64))


def test_decay_only_on_matrices_and_never_codebooks(tiny_tokenizer):
    groups = parameter_groups(tiny_tokenizer, 1e-4)
    decayed = {id(p) for p in groups[0]["params"]}
    assert groups[0]["weight_decay"] == 1e-4 and groups[1]["weight_decay"] == 0.0
    assert all(p.ndim >= 2 for p in groups[0]["params"]) and all(p.ndim < 2 for p in groups[1]["params"])
    in_optimizer = {
        id(p) for g in build_optimizer(tiny_tokenizer, OptimizerConfig()).param_groups for p in g["params"]
    }
    codebooks = [b for n, b in tiny_tokenizer.named_buffers() if n.endswith("codebook")]
    assert len(codebooks) == 2 and not any(id(c) in in_optimizer for c in codebooks)
    assert decayed < in_optimizer


def test_warmup_then_cosine():
    config = OptimizerConfig(lr=1.0, warmup_steps=10, min_lr=0.1)
    assert lr_factor(0, 110, config) == pytest.approx(0.1)
    assert lr_factor(9, 110, config) == pytest.approx(1.0)
    assert lr_factor(60, 110, config) == pytest.approx(0.55)
    assert lr_factor(110, 110, config) == pytest.approx(0.1)
    assert lr_factor(50, 110, OptimizerConfig(lr=1.0, warmup_steps=10, schedule="constant")) == 1.0


def _trainable(tok, part) -> bool:
    return any(p.requires_grad for p in part.parameters())


def test_freeze_presets(tiny_tokenizer):
    tok, cfg = tiny_tokenizer, tiny_tokenizer.config
    parts = tok.backbone.parts()
    apply_freeze(tok, FreezeConfig("stage0"))
    assert not any(_trainable(tok, parts[i]) for i in range(cfg.semantic_layer + 1))
    assert _trainable(tok, parts[cfg.semantic_layer + 1]) and _trainable(tok, parts["head"])
    assert _trainable(tok, tok.decoder) and _trainable(tok, tok.pixel.down)

    apply_freeze(tok, FreezeConfig("stage2"))
    assert not any(
        _trainable(tok, m) for m in (tok.pixel.down, tok.pixel.up, tok.pixel_shortcut, tok.decoder)
    )
    assert not _trainable(tok, parts[cfg.shortcut_layer]) and _trainable(tok, parts[cfg.shortcut_layer + 1])
    set_train_mode(tok, FreezeConfig("stage2"))
    assert tok.training and not tok.pixel.quantizer.training and tok.semantic.quantizer.training

    frozen = apply_freeze(tok, FreezeConfig("finetune", finetune_last_layers=2))
    layers = tok.backbone.num_layers
    assert not any(_trainable(tok, parts[i]) for i in range(layers - 1))
    assert (
        _trainable(tok, parts[layers - 1]) and _trainable(tok, parts[layers]) and _trainable(tok, tok.decoder)
    )
    assert all(n.startswith("backbone.") for n in frozen)

    assert apply_freeze(tok, FreezeConfig("stage1")) == []


def test_config_round_trip_and_override_validation():
    config = load_train_config(None, ["max_steps=7", "loss.gan.discriminator.channels=[32,32,64,64]"])
    again = from_dict(TrainConfig, json.loads(json.dumps(to_dict(config))))
    assert again == config and again.loss.gan.discriminator.channels == (32, 32, 64, 64)
    for bad in ("loss.nope=1", "max_steps=ten", "freeze.preset=stage9", "precision=fp8"):
        with pytest.raises(ConfigError):
            load_train_config(None, [bad])
    with pytest.raises(ConfigError, match="teacher"):
        load_train_config(None, ["teacher=none"])


def test_tail_steps_at_its_own_learning_rate(tiny_tokenizer):
    tok = tiny_tokenizer
    apply_freeze(tok, FreezeConfig("stage0"))
    scales = tail_lr_scales(tok, FreezeConfig("stage0", tail_lr_scale=0.05))
    optimizer = build_optimizer(tok, OptimizerConfig(lr=1e-3), scales)
    tail = {id(p) for module in tail_modules(tok) for p in module.parameters()}
    assert tail and optimizer.param_groups[0]["lr"] == pytest.approx(1e-3)  # the logged lr is the unscaled one
    for group in optimizer.param_groups:
        in_tail = {id(p) in tail for p in group["params"]}
        assert len(in_tail) == 1  # a group is all tail or no tail
        assert group["lr"] == pytest.approx(5e-5 if in_tail == {True} else 1e-3)
    assert tail_lr_scales(tok, FreezeConfig("stage0")) == []  # scale 1: the groups are the plain two
    with pytest.raises(ConfigError):
        FreezeConfig(tail_lr_scale=0.0)
