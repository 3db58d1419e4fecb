"""The model a training run starts from, beside the registry: a new model from an architecture name or a config
file (random weights, or the tower of ``backbone_pretrained``), or trained weights to fine-tune; ``init_from`` /
``init_parts`` copy parts of a trained model into a new one, growing its codebooks when asked.

The trainer, the command line, recipes and tests build models here (never through the training package)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from .config import TokenizerConfig, apply_overrides
from .errors import ConfigError
from .registry import is_model, model_entry
from .tokenizer import DualTokenizer

if TYPE_CHECKING:
    from .training.config import TrainConfig


def build_tokenizer(config: TrainConfig) -> DualTokenizer:
    """The model a run starts from: an architecture name or a tokenizer config JSON (random init, or the tower of
    ``backbone_pretrained``), or trained weights (fine-tuning): a trained name, a folder or a Hub repo id."""
    source = config.model
    if source.endswith(".json"):
        model_config = TokenizerConfig.load(source)
    elif is_model(source) and not model_entry(source).trained:
        model_config = model_entry(source).config()
    else:
        model_config = None
    if model_config is None:
        if config.model_overrides:
            raise ConfigError("model_overrides apply to new models only, not to a trained model")
        return DualTokenizer.from_pretrained(source)
    model_config = apply_overrides(model_config, config.model_overrides)
    tokenizer = DualTokenizer.from_config(model_config, config.backbone_pretrained)
    if config.init_from is not None:
        trained = DualTokenizer.from_pretrained(config.init_from)
        init_parts_from(tokenizer, trained, config.init_parts, config.init_grow_codebooks)
    return tokenizer


# the state-dict prefixes of each part of a tokenizer that a run can start from a trained model
PART_PREFIXES = {
    "backbone": ("backbone.",),
    "pixel": ("pixel.", "pixel_shortcut."),
    "semantic": ("semantic.",),
    "decoder": ("decoder.",),
}


def init_parts_from(
    tokenizer: DualTokenizer, trained: DualTokenizer, parts: list[str], grow_codebooks: bool = False
) -> list[str]:
    """Copy the weights of ``parts`` from a trained tokenizer of the same shapes there; returns the copied names.

    ``grow_codebooks``: a quantizer of this model may have more codes (same code width) than the trained one's; its
    first codes are then the trained ones, and the codes added start as copies of them (so the quantized vectors,
    and the model's output, are the trained model's) with no cluster size, so the first training update restarts
    them from the batch's residuals. A shared codebook (K, D) starts per-depth codebooks (Q, K, D) of the same K
    and width as Q copies of itself (``codebook_sharing`` shared -> per_depth): every depth searches the codes it
    searched before, so the quantized vectors are the trained model's.
    """
    prefixes = tuple(prefix for part in parts for prefix in PART_PREFIXES[part])
    source = trained.state_dict()
    target = tokenizer.state_dict()
    copied = {}
    for name, value in source.items():
        if not name.startswith(prefixes):
            continue
        if grow_codebooks and _grows(name, value, target):
            value = _grown(name, value, target[name].shape[0])
        if _splits_per_depth(name, value, target):
            value = value.expand(target[name].shape).clone()  # (K, ...) -> (Q, K, ...)
        if name not in target or target[name].shape != value.shape:
            hint = "drop its part from init_parts"
            if _grows(name, value, target):
                hint += " or set init_grow_codebooks to start a larger codebook from it"
            raise ConfigError(
                f"init_from: {name} {tuple(value.shape)} does not fit this model "
                f"({tuple(target[name].shape) if name in target else 'no such weight'}); {hint}"
            )
        copied[name] = value.to(target[name].dtype)
    tokenizer.load_state_dict(copied, strict=False)
    return sorted(copied)


# a residual quantizer's buffers with one row per code
CODEBOOK_BUFFERS = ("quantizer.codebook", "quantizer.cluster_size", "quantizer.embed_sum")


def _grows(name: str, value: torch.Tensor, target: dict[str, torch.Tensor]) -> bool:
    return (
        name.endswith(CODEBOOK_BUFFERS)
        and name in target
        and target[name].shape[1:] == value.shape[1:]
        and target[name].shape[0] > value.shape[0]
    )


def _splits_per_depth(name: str, value: torch.Tensor, target: dict[str, torch.Tensor]) -> bool:
    """Whether a shared codebook buffer (K, ...) meets the per-depth one (Q, K, ...) of this model."""
    return name.endswith(CODEBOOK_BUFFERS) and name in target and target[name].shape[1:] == value.shape


def _grown(name: str, value: torch.Tensor, codebook_size: int) -> torch.Tensor:
    """``value`` (K, ...) of a codebook buffer extended to ``codebook_size`` rows: the added codes repeat the
    trained ones, with zero cluster size and vector sum (dead: restarted at the first update)."""
    if name.endswith("quantizer.codebook"):  # (K, D)
        return value.repeat(-(-codebook_size // value.shape[0]), 1)[:codebook_size]
    added = value.new_zeros((codebook_size - value.shape[0], *value.shape[1:]))
    return torch.cat([value, added])
