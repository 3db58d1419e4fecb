"""Checkpoints: ``save_pretrained`` / ``from_pretrained`` (config.json + model.safetensors + a model card), and the
import of the authors' release format (a ``config.json`` with an ``rqvaesiglip`` block and a reference state dict)."""

from __future__ import annotations

import dataclasses
import os
import shutil
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .config import (
    DecoderConfig,
    ProjectionConfig,
    QuantizerConfig,
    TokenizerConfig,
    read_json,
)
from .errors import CheckpointError, ConfigError
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
        + (f" Fine-tuned from `{config.base_model}`." if config.base_model else ""),
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
    return tokenizer.eval()


# ----------------------------------------------------------------------------------------------------------------
# The authors' release format
# ----------------------------------------------------------------------------------------------------------------

_PREFIXES = (  # reference state-dict prefix -> ours
    ("siglip_model.vision_model.", "backbone.vision_model."),
    ("prequant_pix.", "pixel.down."),
    ("postquant_pix.", "pixel.up."),
    ("prequant_shortcut.", "pixel_shortcut."),
    ("prequant_sem.", "semantic.down."),
    ("postquant_sem.", "semantic.up."),
    ("post_quant_conv.", "decoder.post_quant_conv."),
    ("decoder.", "decoder.decoder."),
)
_QUANTIZERS = (("quantizer_pix.", "pixel.quantizer."), ("quantizer_sem.", "semantic.quantizer."))
_SKIPPED = ("siglip_model.text_model.", "siglip_model.logit_scale", "siglip_model.logit_bias")


def _quantizer_config(block: dict, where: str) -> QuantizerConfig:
    bottleneck = block.get("bottleneck_type")
    if bottleneck not in ("rq", "rq_ema"):
        raise ConfigError(f"{where}.bottleneck_type must be 'rq' or 'rq_ema', got {bottleneck!r}")
    if not block.get("shared_codebook", True):
        raise ConfigError(f"{where}.shared_codebook false is not supported (the releases share one codebook)")
    code_shape, latent_shape = block["code_shape"], block["latent_shape"]
    if list(latent_shape[:2]) != list(code_shape[:2]):
        raise ConfigError(f"{where}: latent_shape {latent_shape} and code_shape {code_shape} differ in the grid")
    return QuantizerConfig(
        codebook_size=int(block["n_embed"]),
        code_dim=int(block["embed_dim"]),
        depth=int(code_shape[-1]),
        decay=float(block.get("decay", 0.99)),
        restart_unused_codes=bool(block.get("restart_unused_codes", True)),
        ema_schedule="per_depth" if bottleneck == "rq" else "per_step",
        per_step_final_residual=bottleneck == "rq_ema",  # the release's aliasing, reproduced on import
    )


def reference_config(release_config: dict, siglip_dir: str | Path, name: str = "converted") -> TokenizerConfig:
    """Our config for a release ``config.json`` (its ``rqvaesiglip`` block) and the SigLIP folder it names."""
    from .backbones.siglip import config_from_pretrained

    block = release_config.get("rqvaesiglip")
    if not isinstance(block, dict):
        raise ConfigError("release config has no 'rqvaesiglip' block")
    try:
        dd = block["ddconfig"]
        backbone = config_from_pretrained(siglip_dir)
        if int(block["hidden_size"]) != backbone.width:
            raise ConfigError(f"rqvaesiglip.hidden_size {block['hidden_size']} != SigLIP width {backbone.width}")
        latent = block.get("decoder_latent_shape")
        config = TokenizerConfig(
            name=name,
            backbone=backbone,
            pixel_layer=int(block["layer_recon"]),
            shortcut_layer=None if block.get("layer_shortcut") is None else int(block["layer_shortcut"]),
            shortcut_weight=float(block.get("weight_shortcut", 0.0) or 0.0),
            semantic_layer=int(block["layer_sem"]),
            pixel_quantizer=_quantizer_config(block["vq_pix"], "rqvaesiglip.vq_pix"),
            semantic_quantizer=_quantizer_config(block["vq_sem"], "rqvaesiglip.vq_sem"),
            projection=ProjectionConfig(),
            decoder=DecoderConfig(
                channels=int(dd["ch"]),
                channel_mult=tuple(int(c) for c in dd["ch_mult"]),
                num_res_blocks=int(dd["num_res_blocks"]),
                attn_resolutions=tuple(int(r) for r in dd["attn_resolutions"]),
                resolution=int(dd["resolution"]),
                in_channels=int(dd["decoder_in_channels"]),
                latent_size=None if latent is None else (int(latent[0]), int(latent[1])),
                out_channels=int(dd.get("out_ch", 3)),
                dropout=float(dd.get("dropout", 0.0)),
            ),
        )
    except KeyError as exc:
        raise ConfigError(f"release config lacks the key {exc.args[0]!r}") from None
    return config


def reference_state_dict(state: dict[str, torch.Tensor], config: TokenizerConfig) -> dict[str, torch.Tensor]:
    """Rename a reference state dict to ours; the Q identical codebook copies become one (checked identical)."""
    ours: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key.startswith(_SKIPPED):
            continue
        for ref_prefix, our_prefix in _QUANTIZERS:
            if key.startswith(ref_prefix):
                _, depth, field = key[len(ref_prefix) :].split(".", 2)
                target = our_prefix + {"weight": "codebook", "cluster_size_ema": "cluster_size", "embed_ema": "embed_sum"}[field]
                if field == "weight":
                    value = value[:-1]  # drop the padding row
                if target in ours and not torch.equal(ours[target], value):
                    raise CheckpointError(f"{key}: codebook copies differ across depths (expected one shared codebook)")
                ours[target] = value
                break
        else:
            for ref_prefix, our_prefix in _PREFIXES:
                if key.startswith(ref_prefix):
                    ours[our_prefix + key[len(ref_prefix) :]] = value
                    break
            else:
                ours[key] = value  # reported as unexpected on load
    return ours


def convert_reference(
    config_path: str | Path, weights_path: str | Path, siglip_dir: str | Path, out_dir: str | Path
) -> DualTokenizer:
    """Import a release checkpoint into a ``save_pretrained`` folder and return the loaded tokenizer.

    ``out_dir/siglip`` receives the SigLIP folder (config, processor/tokenizer files) with the checkpoint's frozen text
    tower and the original vision weights: the teacher for training and the text tower for zero-shot evaluation.
    """
    from transformers import SiglipModel

    from .tokenizer import DualTokenizer

    config_path, siglip_dir, out_dir = Path(config_path), Path(siglip_dir), Path(out_dir)
    release = read_json(config_path, "release config")
    config = reference_config(release, siglip_dir, name=out_dir.name)
    state = read_weights(Path(weights_path))

    out_dir.mkdir(parents=True, exist_ok=True)
    teacher_dir = out_dir / "siglip"
    siglip = SiglipModel.from_pretrained(siglip_dir).float()
    text_state = {
        k[len("siglip_model.") :]: v for k, v in state.items() if k.startswith(_SKIPPED)
    }
    siglip.load_state_dict(text_state, strict=False)
    siglip.save_pretrained(teacher_dir)
    for extra in siglip_dir.iterdir():  # processor and text-tokenizer files
        if extra.is_file() and extra.name not in (CONFIG_NAME, WEIGHTS_NAME) and not extra.name.endswith((".bin", ".safetensors")):
            shutil.copy2(extra, teacher_dir / extra.name)
    config.backbone.pretrained = "siglip"

    tokenizer = DualTokenizer.from_config(config)
    tokenizer.model_dir = out_dir
    load_state(tokenizer, reference_state_dict(state, config), strict=True, source=str(weights_path))
    save_pretrained(tokenizer, out_dir)
    return tokenizer.eval()
