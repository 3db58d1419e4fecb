"""The pixel branch alone on cached pixel-tap tokens of the frozen tower (``branch: "pixel"`` + ``cache.pixel_tap``).

Under ``branch: "pixel"`` the whole tower is frozen, so the tokens at the pixel tap of a crop are the same at every
step, whatever the pixel path and the decoder do. With ``cache.pixel_tap`` the tower runs once per training crop
(``cache.crops_per_image`` crops per image, the crops the image loader gives for epochs 0, 1, ...); the crop (8-bit,
as decoded) and its tap tokens stay in memory, and each step runs only what trains:

    crop -> frozen tower 1..pixel_layer -> tap tokens (N, T, h*w, W)                       } once per crop
    tap tokens -> down (+ shortcut) -> residual quantizer -> up -> decoder -> reconstruction   (each step)
    loss = the pixel branch's objective (commitment, MSE, L1, perceptual) against the cached crop

The training loop is the engine's; :class:`PixelTapTask` gives it the model's pixel path
(``forward(tap_tokens, pixel_tap=True)``) and the cache as its data. Under torchrun every process computes the
(deterministic) cache itself and trains on its share of each batch. ``dualtoken finetune`` is built on it.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from ..data.images import SkippedImageWarning, decode_crops, warn_skipped
from ..data.sources import resolve_source
from ..errors import ConfigError, DataError, ImageError
from ..factory import build_tokenizer
from ..tokenizer import DualTokenizer
from .config import TrainConfig
from .distributed import Runtime, wrap_model
from .engine import Engine, ShuffledBatches
from .freeze import freeze_outside_pixel_branch, set_train_mode
from .monitor import CodebookMonitor
from .tasks import HeldOutImages, TokenizerModelTask, make_objective


@dataclass
class PixelTapCache:
    """Per crop: the crop as decoded (8-bit) and the frozen tower's tokens at the pixel tap (and the shortcut's)."""

    images: torch.Tensor  # (N, 3, H, W) uint8
    tokens: torch.Tensor  # (N, T, h*w, W): T = 1, or 2 with a shortcut
    ids: list[str]  # "<image id>#<crop>"

    def __len__(self) -> int:
        return self.images.shape[0]

    def batch(self, index: torch.Tensor, device: torch.device | None = None) -> dict[str, torch.Tensor]:
        """``{"images": (B, 3, H, W) in [-1, 1], "taps": (B, T, h*w, W)}``, float32, on ``device``."""
        images = self.images[index].to(device).float() / 127.5 - 1.0  # what the image loader gives, bit for bit
        return {"images": images, "taps": self.tokens[index].to(device).float()}


@torch.no_grad()
def pixel_tap_tokens(tokenizer: DualTokenizer, images: torch.Tensor) -> torch.Tensor:
    """The tower's tokens at the pixel tap, and at the shortcut's tap second when there is one: (B, T, h*w, W), what
    :meth:`DualTokenizer.forward_pixel_taps` reads."""
    cfg = tokenizer.config
    layers = [cfg.pixel_layer] + ([cfg.shortcut_layer] if cfg.shortcut_layer is not None else [])
    states = tokenizer.backbone.forward_all(images, stop=max(layers))
    return torch.stack([tokenizer.backbone.to_tokens(layer, states[layer]) for layer in layers], dim=1)


def build_pixel_tap_cache(
    config: TrainConfig, tokenizer: DualTokenizer, spec: str, progress: bool = True
) -> PixelTapCache:
    """The crops of every readable image of ``spec`` (``cache.crops_per_image`` each, ``data.crop_scale``) and their
    pixel-tap tokens, computed ``cache.batch_size`` crops at a time with the tower in eval mode. An unreadable
    image is skipped with a :class:`~dualtoken.data.SkippedImageWarning`; none readable is a DataError."""
    device = next(tokenizer.parameters()).device
    dtype = torch.float16 if config.cache.dtype == "float16" else torch.float32
    crops, size = config.cache.crops_per_image, tokenizer.image_size
    records = [record for record, _ in resolve_source(spec).walk(seed=config.seed)]
    training = tokenizer.backbone.training
    tokenizer.backbone.eval().to(memory_format=torch.channels_last)  # faster convolutions on a CPU; same values
    images: list[torch.Tensor] = []
    ids: list[str] = []
    tokens: list[torch.Tensor] = []
    pending: list[torch.Tensor] = []
    bar = tqdm(total=len(records), desc="pixel-tap cache", unit="img", disable=not progress)
    for number, record in enumerate(records, 1):
        try:
            pending += decode_crops(record, size, crops, True, config.seed, 0, config.data.crop_scale)
            ids += [f"{record.id}#{crop}" for crop in range(crops)]
        except ImageError as exc:
            warn_skipped(record.id, str(exc))
        while len(pending) >= config.cache.batch_size or (pending and number == len(records)):
            batch = torch.stack(pending[: config.cache.batch_size])
            pending = pending[config.cache.batch_size :]
            taps = pixel_tap_tokens(tokenizer, batch.to(device, memory_format=torch.channels_last))
            tokens.append(taps.to("cpu", dtype))
            images.append(torch.round((batch + 1.0) * 127.5).to(torch.uint8))
        bar.update(1)
    bar.close()
    tokenizer.backbone.train(training)
    if not ids:
        raise DataError(f"{spec}: no readable image to train on")
    return PixelTapCache(torch.cat(images), torch.cat(tokens), ids)


class PixelTapTask(TokenizerModelTask):
    """The pixel branch on cached pixel-tap tokens: down-projection (and shortcut projection), pixel codebook (EMA)
    and up-projection, and the decoder train; the tower and the semantic branch keep their weights. The loss is the
    objective without its semantic terms. ``tokenizer`` may be given (``dualtoken finetune`` gives the trained model
    at its training resolution); otherwise it comes from the config. Held-out images (``data.eval``) are scored
    as in the image task."""

    name = "pixel_tap"
    pixel_only = True  # what the held-out evaluation runs

    def __init__(self, engine: Engine, tokenizer: DualTokenizer | None = None) -> None:
        config: TrainConfig = engine.config
        runtime = engine.runtime
        self.engine, self.config = engine, config
        tok = tokenizer if tokenizer is not None else build_tokenizer(config)
        if tok.pixel.down is None:
            raise ConfigError("cache.pixel_tap needs a model with a pixel vocabulary of its own (this one has one tap)")
        if config.data.eval_image_size and runtime.distributed and config.parallel == "fsdp":
            raise ConfigError("data.eval_image_size needs the whole model in one process: use parallel=ddp")
        self.frozen = freeze_outside_pixel_branch(tok)
        self.model = self.tokenizer = tok.to(runtime.device)
        self.objective = make_objective(config.loss, runtime.device)
        with warnings.catch_warnings():
            warnings.simplefilter("always", SkippedImageWarning)  # each unreadable image is named once
            cache = build_pixel_tap_cache(config, tok, config.data.train, config.log.progress and runtime.is_main)
        self.cache = cache
        self.data = ShuffledBatches(
            len(cache), config.data.batch_size, config.seed, runtime,
            lambda index, epoch: cache.batch(index, runtime.device),
        )
        self.samples_per_batch = self.data.batch_size
        depths = {"pixel": tok.pixel_depth}
        self.usage = CodebookMonitor({"pixel": tok.codebook_size("pixel")}, depths, runtime.device)
        self.heldout = HeldOutImages(self) if config.data.eval else None
        self.callbacks = [c for c in (self.usage, self.heldout) if c is not None]

    def wrap(self, runtime: Runtime, parallel: str) -> nn.Module:
        find_unused = bool(self.config.find_unused_parameters)  # the reconstruction reaches every trained weight
        return wrap_model(self.tokenizer, runtime, parallel, find_unused)

    def train_mode(self) -> None:
        set_train_mode(self.tokenizer, self.config.freeze)

    def loss(self, model: nn.Module, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, float]]:
        out = model(batch["taps"], pixel_tap=True)
        total, terms = self.objective.generator(out, batch["images"])
        self.usage.update("pixel", out.pixel_codes)
        return total, {name: float(value) for name, value in terms.items() if name != "total"}
