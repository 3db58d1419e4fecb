"""The import of the authors' release format: a ``config.json`` with an ``rqvaesiglip`` block and a reference state
dict become our config and a ``save_pretrained`` folder (with the SigLIP teacher beside it)."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from .checkpoint import load_state, read_weights, save_pretrained
from .config import DecoderConfig, ProjectionConfig, QuantizerConfig, TokenizerConfig, read_json
from .errors import CheckpointError, ConfigError
from .registry import CONFIG_NAME, WEIGHTS_NAME
from .tokenizer import DualTokenizer

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
