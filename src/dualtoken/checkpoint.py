"""Checkpoints: ``save_pretrained`` / ``from_pretrained`` (config.json + model.safetensors + a model card). The import
of the authors' release format is :mod:`dualtoken.reference`."""

from __future__ import annotations

import dataclasses
import hashlib
import os
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .config import (
    TokenizerConfig,
)
from .errors import CheckpointError
from .io import replace_with_default_mode
from .registry import CARD_NAME, CONFIG_NAME, WEIGHTS_NAME, is_model, resolve_model_dir

if TYPE_CHECKING:
    from .tokenizer import DualTokenizer


def save_pretrained(
    tokenizer: DualTokenizer,
    path: str | Path,
    dtype: torch.dtype | None = None,
    metrics: dict[str, Any] | None = None,
    name: str | None = None,
) -> Path:
    """Write the config, the tokenizer's weights (atomically) and a model card into folder ``path``; ``dtype`` (for
    example ``torch.float16``, half the size) applies to the floating-point tensors; ``metrics`` (name -> value,
    e.g. the figures of an evaluation) go into the card. The saved model is named ``name``, or by
    :func:`export_name`; a renamed trained model records what it was fine-tuned from (``base_model``)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config = exported_config(tokenizer, path, name)
    state = {k: v.detach().contiguous().cpu() for k, v in tokenizer.state_dict().items()}
    if dtype is not None:
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    tmp = path / f".{WEIGHTS_NAME}.tmp{os.getpid()}"
    save_file(state, str(tmp), metadata={"format": "pt", "model": config.name})
    replace_with_default_mode(tmp, path / WEIGHTS_NAME)
    config.save(path / CONFIG_NAME)
    (path / CARD_NAME).write_text(model_card(tokenizer, metrics, config))
    return path


def export_name(path: Path) -> str:
    """The name of a model written to folder ``path``: the folder's name; for the trainer's ``RUN/final`` the
    run's name ``RUN``, for ``RUN/export-00001000`` ``RUN-export-00001000``."""
    folder = path.resolve()
    if folder.name == "final":
        return folder.parent.name
    if folder.name.startswith("export-"):
        return f"{folder.parent.name}-{folder.name}"
    return folder.name


def exported_config(tokenizer: DualTokenizer, path: Path, name: str | None) -> TokenizerConfig:
    """The config to save. Trained weights loaded under one name and saved elsewhere (a fine-tuned model, a copy)
    take the export's name and record the loaded name as ``base_model``; a model built from an architecture, or
    renamed in its config, keeps its config's name unless ``name`` is given."""
    config = tokenizer.config
    loaded_as = getattr(tokenizer, "pretrained_name", None)  # set by load_pretrained
    if name is None and loaded_as == config.name:
        name = export_name(path)
    if name is None or name == config.name:
        return config
    base = config.name if loaded_as is not None else config.base_model
    return dataclasses.replace(config, name=name, base_model=base)


def model_card(
    tokenizer: DualTokenizer, metrics: dict[str, Any] | None = None, config: TokenizerConfig | None = None
) -> str:
    """The README.md of a model folder: Hub metadata, what the tokens are, the rate, the figures, the config
    (``config``: the one saved, default the tokenizer's)."""
    from huggingface_hub import ModelCardData

    config = config or tokenizer.config
    h, w = tokenizer.grid
    rate = tokenizer.bits_per_pixel()
    data = ModelCardData(library_name="dualtoken", tags=["image-tokenizer", "dualtoken"], license="apache-2.0")
    lines = [
        "---",
        data.to_yaml(),
        "---",
        "",
        f"# {config.name}",
        "",
        "A [DualToken](https://arxiv.org/abs/2503.14324) image tokenizer: one backbone, a pixel vocabulary for "
        "reconstruction and a semantic vocabulary for understanding, both residual-quantized."
        + _lineage(tokenizer, config),
        "",
        "```python",
        "from dualtoken import DualTokenizer",
        "",
        'tokenizer = DualTokenizer.from_pretrained("<this folder or org/name>")',
        "```",
        "",
        "| | |",
        "| --- | --- |",
        f"| input | {tokenizer.image_size[0]}x{tokenizer.image_size[1]} RGB |",
        f"| backbone | {config.backbone.kind} |",
        f"| token grid | {h}x{w} |",
    ]
    for branch in ("pixel", "semantic"):
        quantizer = tokenizer.quantizer(branch)
        lines.append(
            f"| {branch} vocabulary | {quantizer.depth} codes per position from {quantizer.codebook_size}, "
            f"{rate[branch]:.4f} bits per pixel |"
        )
    if metrics:
        lines += ["", "## Figures", "", "| metric | value |", "| --- | --- |"]
        lines += [f"| {name} | {value:.4g} |" if isinstance(value, float) else f"| {name} | {value} |"
                  for name, value in metrics.items()]
    lines += ["", "## Config", "", "```json", config.to_json(), "```", ""]
    return "\n".join(lines)


def weights_digest(tokenizer: DualTokenizer) -> str:
    """A digest of the state dict (names, dtypes, shapes and bytes of every tensor): equal digests, equal weights."""
    digest = hashlib.blake2b(digest_size=16)
    for key, value in tokenizer.state_dict().items():
        value = value.detach().cpu().contiguous()
        digest.update(f"{key}:{value.dtype}:{tuple(value.shape)};".encode())
        digest.update(value.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def _lineage(tokenizer: DualTokenizer, config: TokenizerConfig) -> str:
    """The card's sentence on the base model: an export of loaded weights that were not changed since (compared by
    :func:`weights_digest`) is a copy of them, not a fine-tune."""
    if not config.base_model:
        return ""
    loaded_as = getattr(tokenizer, "pretrained_name", None)
    if config.base_model == loaded_as and getattr(tokenizer, "pretrained_digest", None) == weights_digest(tokenizer):
        return f" A copy of `{config.base_model}` (the same weights; nothing was trained)."
    return f" Fine-tuned from `{config.base_model}`."


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    """A safetensors file, or a torch checkpoint (``{"state_dict": ...}`` or a bare state dict, ``module.`` prefixes
    stripped), read with ``weights_only=True``."""
    if not path.is_file():
        raise CheckpointError(f"weights file not found: {path}")
    try:
        if path.suffix == ".safetensors":
            return load_file(str(path))
        raw = torch.load(str(path), map_location="cpu", weights_only=True)
    except (SafetensorError, RuntimeError, OSError, EOFError, ValueError) as exc:
        raise CheckpointError(f"cannot read weights {path}: {exc}") from None
    state = raw.get("state_dict", raw) if isinstance(raw, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path} holds no state dict of tensors")
    return {k.removeprefix("module."): v for k, v in state.items()}


def load_state(tokenizer: DualTokenizer, state: dict[str, torch.Tensor], strict: bool, source: str) -> None:
    """Load ``state``: a shape mismatch (another config) is an error; missing/unexpected keys are reported."""
    own = tokenizer.state_dict()
    _check_codebook_sharing(state, own, source)
    mismatched = [
        f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
        for k, v in state.items()
        if k in own and own[k].shape != v.shape
    ]
    if mismatched:
        raise CheckpointError(
            f"{source} was saved for another config ({len(mismatched)} shape mismatches, e.g. {mismatched[0]})"
        )
    result = tokenizer.load_state_dict(state, strict=False)
    tokenizer.loading_info = {"missing": list(result.missing_keys), "unexpected": list(result.unexpected_keys)}
    if result.missing_keys or result.unexpected_keys:
        message = (
            f"{source}: {len(result.missing_keys)} missing keys {result.missing_keys[:5]}, "
            f"{len(result.unexpected_keys)} unexpected keys {result.unexpected_keys[:5]}"
        )
        if strict:
            raise CheckpointError(message)
        warnings.warn(message, stacklevel=3)


def _check_codebook_sharing(state: dict[str, torch.Tensor], own: dict[str, torch.Tensor], source: str) -> None:
    """A codebook of the other sharing mode (per-depth (Q, K, D) against shared (K, D)) names both modes."""
    sharing = {2: "shared, one (K, D) codebook", 3: "per_depth, one (K, D) codebook per depth"}
    for key, value in state.items():
        if key.endswith("quantizer.codebook") and key in own and value.ndim != own[key].ndim:
            raise CheckpointError(
                f"{source}: {key} is codebook_sharing {sharing.get(value.ndim, '?')} {tuple(value.shape)}, but the "
                f"model is codebook_sharing {sharing.get(own[key].ndim, '?')} {tuple(own[key].shape)}"
            )


def load_pretrained(
    cls: type[DualTokenizer], path_or_name: str | Path, strict: bool = False, revision: str | None = None
) -> DualTokenizer:
    """A trained name, a local folder or a Hub repo id (see :func:`dualtoken.registry.resolve_model_dir`)."""
    path = resolve_model_dir(path_or_name, revision)
    config = TokenizerConfig.load(path / CONFIG_NAME)
    tokenizer = cls.from_config(config)
    tokenizer.model_dir = path
    spec = str(path_or_name)
    tokenizer.name_or_path = spec if is_model(spec) or not Path(spec).is_dir() else str(path.resolve())
    tokenizer.pretrained_name = config.name  # what save_pretrained compares with to name an export
    load_state(tokenizer, read_weights(path / WEIGHTS_NAME), strict, str(path))
    tokenizer.pretrained_digest = weights_digest(tokenizer)  # an export with this digest is a copy (model_card)
    return tokenizer.eval()
