"""DualTokenizer: one pretrained backbone, a pixel vocabulary at a shallow tap, a semantic vocabulary at a deep tap.

    image -> backbone layers 1..semantic_layer -> taps -> down-projections -> latents (B, h*w, D)
          -> residual quantizers -> codes (B, h, w, Q) and quantized latents
             pixel:    up-projection -> decoder -> image
             semantic: up-projection -> replaces the semantic layer's output -> remaining layers -> pooled embedding
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import ModelHubMixin
from torch import nn

from .backbones import Backbone, backbone_class
from .backend import runtime_for
from .config import TokenizerConfig
from .decoder import PixelDecoder
from .errors import CodesError, ConfigError, ImageError
from .precision import inference_autocast, inference_precision
from .projection import AttnProjection
from .quantizer import QuantizerOutput, ResidualQuantizer
from .registry import get_config

BRANCHES = ("pixel", "semantic")


@dataclass
class DualTokens:
    """The two code tensors of a batch of images, each (B, h, w, Q) int64, row-major over the grid."""

    pixel: torch.Tensor
    semantic: torch.Tensor


@dataclass
class SemanticOutput:
    """The semantic path alone, from tap tokens (``forward(tap_tokens, semantic_only=True)``)."""

    codes: torch.Tensor  # (B, h*w, Qs)
    features: torch.Tensor  # (B, h*w, W) replaces the semantic layer's output
    pooled: torch.Tensor  # (B, pooled_width)
    commitment: torch.Tensor  # scalar


@dataclass
class DualTokenizerOutput:
    """Everything a training step needs from one forward.

    Under ``forward(images, pixel_only=True)`` the semantic fields are None and ``semantic_commitment`` is 0.
    """

    pixel_codes: torch.Tensor  # (B, h, w, Qp)
    semantic_codes: torch.Tensor | None  # (B, h, w, Qs)
    pixel_latent: torch.Tensor  # (B, h*w, D) quantizer input
    semantic_latent: torch.Tensor | None  # (B, h*w, D)
    pixel_quantized: torch.Tensor  # (B, h*w, D) straight-through
    semantic_quantized: torch.Tensor | None  # (B, h*w, D)
    semantic_features: torch.Tensor | None  # (B, h*w, W) replaces the semantic layer's output
    pooled: torch.Tensor | None  # (B, pooled_width)
    reconstruction: torch.Tensor  # (B, 3, H, W), unclamped, [-1, 1] scale
    pixel_commitment: torch.Tensor  # scalar
    semantic_commitment: torch.Tensor  # scalar
    hidden_states: list[torch.Tensor] | None = None  # [layer 0 .. L]; layers after the semantic tap are quantized-path

    @property
    def tokens(self) -> DualTokens:
        return DualTokens(self.pixel_codes, self.semantic_codes)


@dataclass
class _Taps:
    pixel_latent: torch.Tensor  # (B, h*w, D)
    semantic_latent: torch.Tensor  # (B, h*w, D)
    hidden_states: list[torch.Tensor] | None


class Branch(nn.Module):
    """One vocabulary: down-projection to the code width, residual quantizer, up-projection back to the tap width.

    Without a quantizer the branch only up-projects codes of another vocabulary (a single-vocabulary model).
    """

    def __init__(self, width: int, quantizer: ResidualQuantizer | None, code_dim: int, projection_config) -> None:
        super().__init__()
        self.down = AttnProjection(width, code_dim, code_dim, projection_config) if quantizer is not None else None
        self.quantizer = quantizer
        self.up = AttnProjection(code_dim, width, code_dim, projection_config)


class DualTokenizer(
    nn.Module,
    ModelHubMixin,
    library_name="dualtoken",
    paper_url="https://arxiv.org/abs/2503.14324",
    tags=["image-tokenizer", "dualtoken"],
):
    """The DualToken tokenizer. Build with :meth:`from_config` (random weights) or :meth:`from_pretrained` (a
    trained name, a local folder or a Hugging Face Hub repo id); ``push_to_hub`` comes from ``ModelHubMixin``."""

    def __init__(self, config: TokenizerConfig, backbone: Backbone) -> None:
        super().__init__()
        self.config = config
        self.model_dir: Path | None = None
        self.name_or_path: str | None = None  # what from_pretrained was given (a folder: its absolute path)
        self.loading_info: dict[str, list[str]] = {"missing": [], "unexpected": []}
        # encode / decode precision, "auto" | "fp32" | "bf16" (see dualtoken.precision); None: the process default
        self.precision: str | None = None
        # encode / decode engine, "auto" | "torch" | "onnxruntime" (see dualtoken.backend); None: the process default
        self.backend: str | None = None
        self.backbone = backbone
        pixel_width = backbone.tap_width(config.pixel_layer)
        semantic_code_dim = config.semantic_quantizer.code_dim
        pixel_quantizer = ResidualQuantizer(config.pixel_quantizer) if config.pixel_quantizer is not None else None
        pixel_code_dim = config.pixel_quantizer.code_dim if pixel_quantizer is not None else semantic_code_dim
        self.pixel = Branch(pixel_width, pixel_quantizer, pixel_code_dim, config.projection)
        self.pixel_shortcut = None
        if config.shortcut_layer is not None:
            if backbone.tap_width(config.shortcut_layer) != pixel_width:
                raise ConfigError("the shortcut tap must have the pixel tap's width")
            code_dim = config.pixel_quantizer.code_dim
            self.pixel_shortcut = AttnProjection(
                pixel_width, code_dim, code_dim, config.projection
            )
        semantic_width = backbone.tap_width(config.semantic_layer)
        self.semantic = Branch(
            semantic_width, ResidualQuantizer(config.semantic_quantizer), semantic_code_dim, config.projection
        )
        self.decoder = PixelDecoder(pixel_width, backbone.grid, config.decoder)
        expected = tuple(s * config.decoder.upsample_factor for s in (config.decoder.latent_size or backbone.grid))
        if expected != backbone.image_size:
            raise ConfigError(
                f"the decoder outputs {expected} images but the backbone takes {backbone.image_size}: "
                "adjust decoder.channel_mult or decoder.latent_size"
            )

    # ------------------------------------------------------------------------------------------------------------
    # construction and checkpoints
    # ------------------------------------------------------------------------------------------------------------

    @classmethod
    def from_config(
        cls, name_or_config: str | TokenizerConfig, backbone_path: str | Path | None = None
    ) -> DualTokenizer:
        """A new tokenizer from a registered name or a config: random weights, or the backbone's pretrained weights
        from a local folder (families that take one)."""
        config = get_config(name_or_config) if isinstance(name_or_config, str) else name_or_config
        if backbone_path is not None:
            config = dataclasses.replace(config, backbone=config.backbone.with_pretrained_folder(backbone_path))
        tokenizer = cls(config, backbone_class(config.backbone.kind).from_config(config.backbone))
        if backbone_path is not None:
            tokenizer.init_backbone_from_teacher()
        return tokenizer

    @classmethod
    def from_pretrained(
        cls, path_or_name: str | Path, strict: bool = False, *, revision: str | None = None
    ) -> DualTokenizer:
        """Load trained weights, in eval mode: a trained model's name (``dualtoken.list_models(trained=True)``), a
        folder written by :meth:`save_pretrained`, or a Hugging Face Hub repo id ``org/name`` (at ``revision``),
        downloaded into the Hugging Face cache (``HF_HUB_OFFLINE=1``: the cache only)."""
        from .checkpoint import load_pretrained

        return load_pretrained(cls, path_or_name, strict=strict, revision=revision)

    def save_pretrained(
        self,
        save_directory: str | Path,
        dtype: torch.dtype | None = None,
        *,
        metrics: dict[str, Any] | None = None,
        push_to_hub: bool = False,
        repo_id: str | None = None,
        **push_to_hub_kwargs: Any,
    ) -> Path:
        """Write ``config.json``, ``model.safetensors`` (tokenizer weights only, never a teacher) and a model card
        ``README.md`` (config, bits per pixel of each vocabulary, ``metrics`` when given; what it was fine-tuned
        from, or a copy of when no weight changed since :meth:`from_pretrained`); ``dtype`` casts the
        floating-point weights (``torch.float16`` halves the file). ``push_to_hub`` then uploads the folder to
        ``repo_id`` (default: the folder's name) with ``ModelHubMixin.push_to_hub``."""
        from .checkpoint import save_pretrained

        path = save_pretrained(self, save_directory, dtype, metrics)
        if push_to_hub:
            self.push_to_hub(repo_id or path.name, **push_to_hub_kwargs)
        return path

    def export_onnx(self, folder: str | Path) -> Path:
        """Write ``encoder.onnx`` (images -> codes of both vocabularies), ``decoder.onnx`` (pixel codes of any first
        depths -> images) and ``manifest.json`` for ONNX Runtime without PyTorch (see :mod:`dualtoken.export`)."""
        from .export import export_onnx

        return export_onnx(self, folder)

    def _save_pretrained(self, save_directory: Path) -> None:
        """What ``ModelHubMixin.push_to_hub`` writes before uploading: the same folder as :meth:`save_pretrained`."""
        from .checkpoint import save_pretrained

        save_pretrained(self, save_directory)

    def at_resolution(self, image_size: int) -> DualTokenizer:
        """This tokenizer's weights for ``image_size`` inputs (convolutional backbones only; see
        :meth:`TokenizerConfig.at_resolution`). A new module, in this one's train/eval mode."""
        resized = type(self).from_config(self.config.at_resolution(image_size))
        resized.load_state_dict(self.state_dict())
        resized.model_dir = self.model_dir
        return resized.train(self.training)

    def init_backbone_from_teacher(self) -> DualTokenizer:
        """Start the trainable backbone from the pretrained weights (the usual start of tokenizer training)."""
        self.backbone.load_state_dict(self.teacher().state_dict())
        return self

    def teacher(self) -> Backbone:
        """The frozen pretrained backbone (the distillation target), built from ``config.backbone``."""
        return backbone_class(self.config.backbone.kind).teacher(self.config.backbone, self.model_dir)

    # ------------------------------------------------------------------------------------------------------------
    # shapes
    # ------------------------------------------------------------------------------------------------------------

    @property
    def image_size(self) -> tuple[int, int]:
        return self.backbone.image_size

    @property
    def grid(self) -> tuple[int, int]:
        return self.backbone.grid

    @property
    def pixel_depth(self) -> int:
        return self.quantizer("pixel").depth

    @property
    def semantic_depth(self) -> int:
        return self.config.semantic_quantizer.depth

    def bits_per_pixel(self) -> dict[str, float]:
        """The rate of each vocabulary, ``depth * log2(K) * positions / pixels``, and their ``total`` (a single
        vocabulary counts its one set of codes once)."""
        positions = self.grid[0] * self.grid[1]
        pixels = self.image_size[0] * self.image_size[1]
        rate = {b: self.quantizer(b).depth * math.log2(self.quantizer(b).codebook_size) * positions / pixels
                for b in BRANCHES}
        rate["total"] = rate["semantic"] + (rate["pixel"] if self.pixel.quantizer is not None else 0.0)
        return rate

    def branch(self, name: str) -> Branch:
        if name not in BRANCHES:
            raise CodesError(f"unknown branch {name!r}; expected 'pixel' or 'semantic'")
        return self.pixel if name == "pixel" else self.semantic

    def quantizer(self, branch: str) -> ResidualQuantizer:
        """The quantizer whose codes a vocabulary uses (a single-vocabulary model's pixel codes are semantic codes)."""
        return self.branch(branch).quantizer or self.semantic.quantizer

    def codebook_size(self, branch: str) -> int:
        return self.quantizer(branch).codebook_size

    def codebook(self, branch: str) -> torch.Tensor:
        """The current code vectors (K, D) of a vocabulary."""
        return self.quantizer(branch).codebook

    # ------------------------------------------------------------------------------------------------------------
    # the forward pass
    # ------------------------------------------------------------------------------------------------------------

    def forward(
        self,
        images: torch.Tensor,
        output_hidden_states: bool = False,
        pixel_only: bool = False,
        semantic_only: bool = False,
        pixel_tap: bool = False,
    ) -> DualTokenizerOutput | SemanticOutput:
        """Tokenize, reconstruct and pool. In training mode the quantizers update their codebooks (EMA).
        ``pixel_only``: the pixel vocabulary and the decoder alone; the tower runs only up to the pixel tap.
        ``semantic_only``: ``images`` are the tower's tokens at the semantic tap (B, h*w, W), e.g. cached ones;
        the semantic vocabulary and the layers after the tap alone (see :meth:`forward_semantic`).
        ``pixel_tap``: ``images`` are the tower's tokens at the pixel taps; the pixel path alone (see
        :meth:`forward_pixel_taps`)."""
        if pixel_tap:
            return self.forward_pixel_taps(images)
        if pixel_only:
            return self._forward_pixel(images)
        if semantic_only:
            return self.forward_semantic(images)
        return self._quantize_and_decode(self._run_to_taps(images, output_hidden_states))

    def forward_from_taps(self, tap_tokens: dict[int, torch.Tensor]) -> DualTokenizerOutput:
        """:meth:`forward` from the tower's tokens at :meth:`tap_layers` ({layer: (B, h*w, width)}), e.g. cached
        ones: with the tower frozen below its taps a crop gives the same tokens at every step."""
        return self._quantize_and_decode(self.taps_from_tokens(tap_tokens))

    def _quantize_and_decode(self, taps: _Taps) -> DualTokenizerOutput:
        single = self.pixel.quantizer is None  # one vocabulary: the decoder reads the semantic codes
        pixel = None if single else self.pixel.quantizer(taps.pixel_latent)  # first: the release's RNG order
        semantic: QuantizerOutput = self.semantic.quantizer(taps.semantic_latent)
        pixel = semantic if single else pixel
        semantic_features = self.semantic.up(semantic.quantized)  # (B, h*w, W)
        pooled = self.pool_from_features(semantic_features, taps.hidden_states)
        reconstruction = self.decoder(self.pixel.up(pixel.quantized))
        return DualTokenizerOutput(
            pixel_codes=self._grid_codes(pixel.codes),
            semantic_codes=self._grid_codes(semantic.codes),
            pixel_latent=taps.pixel_latent,
            semantic_latent=taps.semantic_latent,
            pixel_quantized=pixel.quantized,
            semantic_quantized=semantic.quantized,
            semantic_features=semantic_features,
            pooled=pooled,
            reconstruction=reconstruction,
            # a single vocabulary counts its one commitment once, under semantic_commitment
            pixel_commitment=torch.zeros_like(semantic.commitment) if single else pixel.commitment,
            semantic_commitment=semantic.commitment,
            hidden_states=taps.hidden_states,
        )

    def _forward_pixel(self, images: torch.Tensor) -> DualTokenizerOutput:
        """The pixel path alone: tower up to the pixel tap, pixel quantizer, up-projection, decoder."""
        return self._pixel_path(self._run_to_taps(images, pixel_only=True).pixel_latent)

    def forward_pixel_taps(self, tap_tokens: torch.Tensor) -> DualTokenizerOutput:
        """The pixel path from the tower's tokens at the pixel tap, e.g. cached ones: (B, T, h*w, W), T = 1, or 2
        with a shortcut (its tap's tokens second). A model with a pixel vocabulary of its own only."""
        latent = self.pixel.down(tap_tokens[:, 0])
        if self.pixel_shortcut is not None:
            latent = latent + self.config.shortcut_weight * self.pixel_shortcut(tap_tokens[:, 1])
        return self._pixel_path(latent)

    def _pixel_path(self, latent: torch.Tensor) -> DualTokenizerOutput:
        """Pixel latents (B, h*w, D) -> pixel quantizer, up-projection, decoder."""
        pixel = self.quantizer("pixel")(latent)
        return DualTokenizerOutput(
            pixel_codes=self._grid_codes(pixel.codes),
            semantic_codes=None,
            pixel_latent=latent,
            semantic_latent=None,
            pixel_quantized=pixel.quantized,
            semantic_quantized=None,
            semantic_features=None,
            pooled=None,
            reconstruction=self.decoder(self.pixel.up(pixel.quantized)),
            pixel_commitment=pixel.commitment,
            semantic_commitment=torch.zeros_like(pixel.commitment),
        )

    def forward_semantic(self, tap_tokens: torch.Tensor) -> SemanticOutput:
        """The semantic path from the tower's tokens at the semantic tap (B, h*w, W): down-projection, quantizer,
        up-projection, the layers after the tap and the head."""
        semantic = self.semantic.quantizer(self.semantic.down(tap_tokens))
        features = self.semantic.up(semantic.quantized)  # (B, h*w, W)
        return SemanticOutput(semantic.codes, features, self.pool_from_features(features), semantic.commitment)

    def tap_layers(self) -> list[int]:
        """The tower layers whose tokens the projections read (pixel tap, shortcut, semantic tap), ascending."""
        cfg = self.config
        layers = {cfg.semantic_layer, *([cfg.pixel_layer] if self.pixel.down is not None else [])}
        return sorted(layers | ({cfg.shortcut_layer} if cfg.shortcut_layer is not None else set()))

    def tap_tokens(
        self, images: torch.Tensor, layers: list[int] | None = None, hidden: list[torch.Tensor] | None = None
    ) -> dict[int, torch.Tensor]:
        """The tower's tokens {layer: (B, h*w, width)} at ``layers`` (default :meth:`tap_layers`); the tower runs
        only up to the deepest. ``hidden`` (a list) receives the states of layers 0 .. that layer."""
        self.check_images(images)
        layers = self.tap_layers() if layers is None else layers
        state = self.backbone.embed(images)
        tokens = {}
        for layer in range(max(layers) + 1):
            if layer:
                state = self.backbone.run_layer(layer, state)
            if hidden is not None:
                hidden.append(state)
            if layer in layers:
                tokens[layer] = self.backbone.to_tokens(layer, state)
        return tokens

    def _run_to_taps(self, images: torch.Tensor, keep_hidden: bool = False, pixel_only: bool = False) -> _Taps:
        """Run layers 1..semantic_layer and project the taps down to the code width. ``pixel_only`` stops at the
        pixel tap and leaves the semantic latent None; a single vocabulary runs to its one tap either way."""
        cfg = self.config
        hidden = [] if keep_hidden else None
        layers = self.tap_layers()
        if pixel_only and self.pixel.down is not None:
            layers = [layer for layer in (cfg.pixel_layer, cfg.shortcut_layer) if layer is not None]
        return self.taps_from_tokens(self.tap_tokens(images, layers, hidden), hidden)

    def taps_from_tokens(self, tokens: dict[int, torch.Tensor], hidden: list[torch.Tensor] | None = None) -> _Taps:
        """The quantizers' inputs from tap tokens; the semantic latent is None where ``tokens`` lack that tap."""
        cfg = self.config
        pixel_latent = self.pixel.down(tokens[cfg.pixel_layer]) if self.pixel.down is not None else None
        semantic_latent = self.semantic.down(tokens[cfg.semantic_layer]) if cfg.semantic_layer in tokens else None
        if cfg.shortcut_layer is not None:
            pixel_latent = pixel_latent + cfg.shortcut_weight * self.pixel_shortcut(tokens[cfg.shortcut_layer])
        if self.pixel.down is None:  # a single vocabulary
            pixel_latent = semantic_latent
        return _Taps(pixel_latent, semantic_latent, hidden)

    def pool_from_features(self, semantic_features: torch.Tensor, hidden: list[torch.Tensor] | None = None) -> torch.Tensor:
        """Continue from the quantized semantic features through the remaining layers, then the head."""
        state = self.backbone.from_tokens(self.config.semantic_layer, semantic_features)
        for layer in range(self.config.semantic_layer + 1, self.backbone.num_layers + 1):
            state = self.backbone.run_layer(layer, state)
            if hidden is not None:
                hidden.append(state)
        return self.backbone.pool(state)

    def _grid_codes(self, codes: torch.Tensor) -> torch.Tensor:
        return codes.view(codes.shape[0], *self.grid, codes.shape[-1])  # (B, h, w, Q)

    # ------------------------------------------------------------------------------------------------------------
    # the tokens API
    # ------------------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def encode(self, images: torch.Tensor, precision: str | None = None, backend: str | None = None) -> DualTokens:
        """Images (B, 3, H, W) in [-1, 1] -> both code tensors; never updates the codebooks.

        ``precision`` ("auto" | "fp32" | "bf16"; None: the model's ``precision`` attribute, else the process default
        of :func:`dualtoken.precision.set_inference_precision`): ``auto`` is bf16 autocast only where the hardware
        multiplies bf16 natively, ``bf16`` elsewhere raises ConfigError. ``backend`` ("auto" | "torch" |
        "onnxruntime"; None: the model's ``backend`` attribute, else :func:`dualtoken.backend.set_inference_backend`'s
        default): where the tower runs (see :mod:`dualtoken.backend`). The search is exact for the latents it gets
        either way; bf16 and ONNX Runtime compute slightly different latents than eager float32, so a few codes can
        differ.
        """
        self.check_images(images)
        precision = precision or self.precision or inference_precision()
        runtime = runtime_for(self, images.device, backend, precision)
        with inference_autocast(precision if runtime is None else "fp32", images.device):
            if runtime is None:
                taps = self._run_to_taps(images)
                pixel_latent, semantic_latent = taps.pixel_latent, taps.semantic_latent
            else:
                pixel_latent, semantic_latent = runtime.latents(images)  # (B, h*w, D) each
            semantic = self.semantic.quantizer(semantic_latent, update=False)
            pixel = semantic
            if self.pixel.quantizer is not None:
                pixel = self.pixel.quantizer(pixel_latent, update=False)
        return DualTokens(self._grid_codes(pixel.codes), self._grid_codes(semantic.codes))

    def pixel_latents(self, images: torch.Tensor) -> torch.Tensor:
        """What the pixel quantizer receives for ``images``: (B, h*w, D), the tower run only up to the pixel tap.
        Differentiable (the re-encoding loss trains through it); call it under ``torch.no_grad()`` to only read."""
        return self._run_to_taps(images, pixel_only=True).pixel_latent

    def decode(self, pixel_codes: torch.Tensor, precision: str | None = None, backend: str | None = None) -> torch.Tensor:
        """Pixel codes (B, h, w, k), any 1 <= k <= Q first depths -> float32 images (B, 3, H, W), unclamped.
        ``precision`` and ``backend``: as in :meth:`encode` (a model in training mode, or a call under autograd that
        needs gradients of the decoder, runs eager)."""
        self.check_codes(pixel_codes, "pixel")
        precision = precision or self.precision or inference_precision()
        differentiable = torch.is_grad_enabled() and any(p.requires_grad for p in self.decoder.parameters())
        runtime = None if differentiable else runtime_for(self, pixel_codes.device, backend, precision)
        if runtime is not None:
            return runtime.decode(pixel_codes)
        latent = self.quantizer("pixel").decode(pixel_codes)  # (B, h, w, D)
        with inference_autocast(precision, latent.device):
            return self.decoder(self.pixel.up(latent.flatten(1, 2))).float()

    def semantic_features(self, semantic_codes: torch.Tensor) -> torch.Tensor:
        """Semantic codes (B, h, w, k) -> up-projected features (B, h*w, W), what the remaining layers receive."""
        latent = self.code_embeddings(semantic_codes, "semantic", per_depth=False)  # (B, h, w, D)
        return self.semantic.up(latent.flatten(1, 2))

    def pooled_embedding(self, semantic_codes: torch.Tensor) -> torch.Tensor:
        """Semantic codes -> the backbone head's output (B, pooled_width) through the remaining layers."""
        return self.pool_from_features(self.semantic_features(semantic_codes))

    def code_embeddings(self, codes: torch.Tensor, branch: str, per_depth: bool = True) -> torch.Tensor:
        """Code vectors (B, h, w, Q, D), or their sum over depth (B, h, w, D) when ``per_depth`` is False."""
        self.check_codes(codes, branch)
        vectors = self.quantizer(branch).lookup(codes)
        return vectors if per_depth else vectors.sum(dim=-2)

    # ------------------------------------------------------------------------------------------------------------
    # input checks
    # ------------------------------------------------------------------------------------------------------------

    def check_images(self, images: torch.Tensor) -> None:
        """Raise ImageError unless ``images`` is a float tensor (B, 3, H, W) of the model's size in [-1, 1]."""
        expected = f"a float tensor (B, 3, {self.image_size[0]}, {self.image_size[1]}) with values in [-1, 1]"
        if not isinstance(images, torch.Tensor):
            raise ImageError(f"images must be {expected}, got {type(images).__name__}")
        if not images.is_floating_point():
            raise ImageError(f"images must be {expected}, got dtype {images.dtype}")
        if images.ndim != 4 or images.shape[1] != 3 or tuple(images.shape[2:]) != self.image_size:
            raise ImageError(f"images must be {expected}, got shape {tuple(images.shape)}")
        if images.numel() == 0:
            raise ImageError(f"images must be {expected}, got an empty batch")
        low, high = float(images.detach().min()), float(images.detach().max())
        if not (low >= -1.01 and high <= 1.01):
            raise ImageError(
                f"images must be {expected}, got values in [{low:.3g}, {high:.3g}] "
                "(use dualtoken.io.load_image, or x / 127.5 - 1 for uint8 data)"
            )

    def check_codes(self, codes: torch.Tensor, branch: str) -> None:
        """Raise CodesError unless ``codes`` is an integer tensor (B, h, w, k), 1 <= k <= Q, values in [0, K)."""
        quantizer = self.quantizer(branch)
        h, w = self.grid
        expected = f"integer {branch} codes (B, {h}, {w}, k) with 1 <= k <= {quantizer.depth} and values in [0, {quantizer.codebook_size})"
        if not isinstance(codes, torch.Tensor) or codes.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
            raise CodesError(f"expected {expected}, got {getattr(codes, 'dtype', type(codes).__name__)}")
        if codes.ndim != 4 or tuple(codes.shape[1:3]) != self.grid or not 1 <= codes.shape[-1] <= quantizer.depth:
            raise CodesError(f"expected {expected}, got shape {tuple(codes.shape)}")
        if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= quantizer.codebook_size):
            raise CodesError(f"expected {expected}, got values in [{int(codes.min())}, {int(codes.max())}]")
