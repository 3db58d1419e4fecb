"""SigLIP / SigLIP 2 vision tower through transformers' own SigLIP modules, run layer by layer."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.checkpoint import checkpoint

from ..errors import CheckpointError, ConfigError
from ..hub import HUB_SCHEME, is_hub_spec, resolve_pretrained_folder
from .base import Backbone, BackboneConfig, register_backbone


@dataclass
class SiglipBackboneConfig(BackboneConfig):
    """A SigLIP / SigLIP 2 (fixed resolution) vision tower, built with transformers' own SigLIP modules."""

    kind: str = "siglip"
    image_size: int = 224
    patch_size: int = 16
    width: int = 768
    num_layers: int = 12
    num_heads: int = 12
    mlp_width: int = 3072
    layer_norm_eps: float = 1e-6
    hidden_act: str = "gelu_pytorch_tanh"
    # the pretrained SigLIP: a Hub repo id ("google/siglip2-so400m-patch14-384", fetched into the Hugging Face
    # cache) or a local folder in save_pretrained format (relative paths are resolved against the model folder):
    # the frozen teacher for training and the text tower for zero-shot evaluation
    pretrained: str | None = None
    pretrained_revision: str | None = None  # a Hub commit, branch or tag (None: main)

    def with_pretrained_folder(self, path: str | Path) -> SiglipBackboneConfig:
        """This config with its tower from ``path``: a local folder (kept as its absolute path) or a Hub repo id
        (kept as ``org/name``, resolved on use)."""
        spec = str(path)
        if is_hub_spec(spec):
            return dataclasses.replace(self, pretrained=spec.removeprefix(HUB_SCHEME))
        return dataclasses.replace(self, pretrained=str(Path(path).resolve()))


def _hf_config(config: SiglipBackboneConfig):
    from transformers import SiglipVisionConfig  # imported on use: transformers takes seconds to import

    hf = SiglipVisionConfig(
        hidden_size=config.width,
        intermediate_size=config.mlp_width,
        num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads,
        image_size=config.image_size,
        patch_size=config.patch_size,
        hidden_act=config.hidden_act,
        layer_norm_eps=config.layer_norm_eps,
    )
    hf._attn_implementation = "sdpa"
    return hf


def resolve_pretrained(config: SiglipBackboneConfig, model_dir: str | Path | None) -> Path | None:
    """The pretrained SigLIP folder of ``config``: a local folder (relative paths are taken from the model folder)
    or a Hub repo id through :func:`dualtoken.registry.resolve_pretrained_folder`; None when none is set."""
    if config.pretrained is None:
        return None
    return resolve_pretrained_folder(config.pretrained, model_dir, config.pretrained_revision)


def config_from_pretrained(spec: str | Path, revision: str | None = None) -> SiglipBackboneConfig:
    """Read the vision-tower numbers of a SigLIP (SiglipModel or SiglipVisionModel format): a local folder or a Hub
    repo id. The config names the tower as it was given (a Hub id stays a Hub id)."""
    from transformers import SiglipVisionConfig

    path = resolve_pretrained_folder(spec, revision=revision)
    if not (path / "config.json").is_file():
        raise CheckpointError(f"{path} is not a SigLIP folder in save_pretrained format (no config.json)")
    hf = SiglipVisionConfig.from_pretrained(path)
    return SiglipBackboneConfig(
        image_size=hf.image_size,
        patch_size=hf.patch_size,
        width=hf.hidden_size,
        num_layers=hf.num_hidden_layers,
        num_heads=hf.num_attention_heads,
        mlp_width=hf.intermediate_size,
        layer_norm_eps=hf.layer_norm_eps,
        hidden_act=hf.hidden_act,
        pretrained=str(spec).removeprefix(HUB_SCHEME) if is_hub_spec(str(spec)) else str(path),
        pretrained_revision=revision,
    )


@register_backbone("siglip", SiglipBackboneConfig)
class SiglipBackbone(Backbone):
    """``embed`` = patch + position embeddings; layer i = encoder layer i; ``pool`` = post-LN + MAP head."""

    def __init__(self, config: SiglipBackboneConfig, vision_model: torch.nn.Module) -> None:
        super().__init__()
        if config.image_size < config.patch_size:
            raise ConfigError(f"image_size {config.image_size} is smaller than patch_size {config.patch_size}")
        self.config = config
        self.vision_model = vision_model  # transformers' SiglipVisionTransformer
        side = config.image_size // config.patch_size  # the stride-patch conv floors: 384 px / 14 -> 27
        self.image_size = (config.image_size, config.image_size)
        self.grid = (side, side)
        self.num_layers = config.num_layers
        self.pooled_width = config.width
        self.gradient_checkpointing = False

    @classmethod
    def from_config(cls, config: SiglipBackboneConfig, model_dir: str | Path | None = None) -> SiglipBackbone:
        from transformers import SiglipVisionModel

        return cls(config, SiglipVisionModel(_hf_config(config)).vision_model)

    @classmethod
    def teacher(cls, config: SiglipBackboneConfig, model_dir: str | Path | None = None) -> SiglipBackbone:
        path = resolve_pretrained(config, model_dir)
        if path is None:
            raise ConfigError("backbone.pretrained is not set: a frozen teacher needs the pretrained SigLIP folder")
        found = config_from_pretrained(path)  # the resolved folder: no second look-up
        if (found.width, found.num_layers, found.patch_size, found.image_size) != (
            config.width,
            config.num_layers,
            config.patch_size,
            config.image_size,
        ):
            raise CheckpointError(f"SigLIP folder {path} does not match the backbone config ({found} vs {config})")
        from transformers import SiglipVisionModel

        model = SiglipVisionModel.from_pretrained(path, attn_implementation="sdpa").float()
        teacher = cls(config, model.vision_model).eval()
        teacher.requires_grad_(False)
        return teacher

    def parts(self) -> dict[int | str, torch.nn.Module]:
        vision = self.vision_model
        parts: dict[int | str, torch.nn.Module] = {0: vision.embeddings}
        parts.update({i + 1: layer for i, layer in enumerate(vision.encoder.layers)})
        parts["head"] = torch.nn.ModuleList([vision.post_layernorm, vision.head])
        return parts

    def tap_width(self, layer: int) -> int:
        return self.config.width

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        weight = self.vision_model.embeddings.patch_embedding.weight
        return self.vision_model.embeddings(images.to(weight.dtype))  # (B, h*w, W)

    def run_layer(self, layer: int, state: torch.Tensor) -> torch.Tensor:
        module = self.vision_model.encoder.layers[layer - 1]
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            out = checkpoint(module, state, None, use_reentrant=False)
        else:
            out = module(state, None)
        return out[0] if isinstance(out, tuple) else out

    def to_tokens(self, layer: int, state: torch.Tensor) -> torch.Tensor:
        return state

    def from_tokens(self, layer: int, tokens: torch.Tensor) -> torch.Tensor:
        return tokens

    def pool(self, state: torch.Tensor) -> torch.Tensor:
        hidden = self.vision_model.post_layernorm(state)
        return self.vision_model.head(hidden)  # (B, W)
