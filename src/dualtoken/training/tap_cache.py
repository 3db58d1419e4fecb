"""The whole tokenizer (``branch: "both"``) trained on cached crops and tap tokens of the frozen tower (``cache.taps``).

With the tower frozen below its taps (freeze preset ``stage0``: layers 0..semantic_layer), a training crop gives
the same tokens at every tap, and the frozen teacher the same targets, at every step. So the tower and the teacher
run once per crop: the crop itself, the tower's tokens at each cached layer and the teacher's pooled output go to a
cache on disk, and each step reads them::

    crop -> frozen tower 0..deepest tap -> tokens at every cached layer    } cached once
    crop -> teacher -> pooled output                                         }
    tap tokens -> projections, quantizers -> decoder (reconstruction of the crop) and layers after the tap (pooled)
    loss = the same objective as without the cache (pixel, perceptual, distillation, commitment)

Only the tower's forward below the taps and the teacher's forward are saved; everything that trains sees what it
would see without the cache. The cached crops are the ones the file loader would make in its first
``cache.crops_per_image`` epochs (crop ``c`` of an image is the training crop of epoch ``c``), visited in a seeded
order per epoch; a run longer than that many epochs sees them again. The teacher's tokens at the semantic tap are the
tower's own there (the cache refuses a tower that differs from the teacher's below its layers), so only its pooled
output is stored. ``cache.layers`` adds layers, so runs that tap different layers of one tower share one cache.
"""

from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from ..config import to_dict
from ..data.images import decode_crops
from ..data.sources import resolve_source
from ..errors import ConfigError, DataError, ImageError
from ..losses import TeacherTargets, teacher_targets
from ..tokenizer import DualTokenizer
from . import checkpoints
from .config import TrainConfig

CACHE_FORMAT = 1


def states_below_tap(tower, semantic_layer: int) -> list[dict[str, torch.Tensor]]:
    """The weights and buffers of ``tower``'s layers 0..``semantic_layer``: all that the tap tokens depend on."""
    parts = tower.parts()
    return [parts[layer].state_dict() for layer in range(semantic_layer + 1)]


def cached_shards(
    config: TrainConfig,
    image_size: tuple[int, int],
    spec: str,
    folder: Path,
    train: bool,
    fingerprint,
    features,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """The shards of a crop cache over the images of ``spec``, computed where missing: per shard of
    ``cache.shard_images`` images, ``{"ids": ["<image id>#<crop>", ...], name: (N, ...) tensor, ...}`` with the
    tensors ``features(crops)`` gives for batches of ``cache.batch_size`` crops (``crops_per_image`` random crops
    of each image for training, one centre crop otherwise). ``fingerprint(image ids)`` says what the contents
    depend on; a folder made for anything else is refused (DataError). Shards are written atomically as they
    finish, so a second call resumes; shards without a readable image are left out."""
    folder.mkdir(parents=True, exist_ok=True)
    records = [record for record, _ in resolve_source(spec).walk(seed=config.seed)]
    expected = fingerprint([record.id for record in records])
    meta = folder / "cache.json"
    if meta.is_file() and json.loads(meta.read_text()) != expected:
        raise DataError(
            f"{folder} holds features made for another model, data or crop setting; remove it or set cache.folder"
        )
    meta.write_text(json.dumps(expected, indent=2) + "\n")
    crops = config.cache.crops_per_image if train else 1
    shard_size = config.cache.shard_images
    shards = []
    skipped: list[str] = []
    bar = tqdm(total=len(records), desc=f"features {'train' if train else 'eval'}", unit="img", disable=not progress)
    for start in range(0, len(records), shard_size):
        path = folder / f"shard-{start // shard_size:05d}.pt"
        chunk = records[start : start + shard_size]
        if not path.is_file():
            images, ids = _crops_of(chunk, config, image_size, crops, train, skipped)
            shard: dict[str, Any] = {"ids": ids}
            parts: dict[str, list[torch.Tensor]] = {}
            batch = config.cache.batch_size
            with torch.no_grad():
                for first in range(0, len(images), batch):
                    crops_batch = torch.stack(images[first : first + batch]).to(memory_format=torch.channels_last)
                    for name, values in features(crops_batch).items():
                        parts.setdefault(name, []).append(values)
            shard.update({name: torch.cat(values) for name, values in parts.items()})
            checkpoints.write_atomic(shard, path)
        shards.append(torch.load(path, map_location="cpu", weights_only=True))
        bar.update(len(chunk))
    bar.close()
    for image_id in skipped:
        tqdm.write(f"skipped unreadable image {image_id}")
    shards = [s for s in shards if s["ids"]]
    if not shards:
        raise DataError(f"{spec}: no readable image to compute features from")
    return shards


def _crops_of(records, config, image_size, crops, train, skipped) -> tuple[list[torch.Tensor], list[str]]:
    """``crops`` crops (3, H, W) of each readable record (:func:`~dualtoken.data.images.decode_crops`: crop ``c``
    is the training crop of epoch ``c``, each file decoded once) and their ids ``<id>#<crop>``."""
    images, ids = [], []
    for record in records:
        try:
            images += decode_crops(record, image_size, crops, train, config.seed, 0, config.data.crop_scale)
        except ImageError as exc:
            skipped.append(f"{record.id}: {exc}")
            continue
        ids += [f"{record.id}#{crop}" for crop in range(crops)]
    return images, ids


@dataclass
class TapCache:
    """Per crop: the crop, the tower's tokens at each cached layer and (with a teacher) its pooled output."""

    images: torch.Tensor  # (N, 3, H, W) in [-1, 1]
    tokens: dict[int, torch.Tensor]  # layer -> (N, h*w, width)
    pooled: torch.Tensor | None  # (N, P) the teacher's pooled output; None without a teacher
    ids: list[str]  # "<image id>#<crop>"

    def __len__(self) -> int:
        return self.images.shape[0]

    def batch(self, index: torch.Tensor, layers: list[int], semantic_layer: int, device: torch.device) -> dict[str, Any]:
        """Float32 crops, the tokens at ``layers`` and the teacher's targets at ``semantic_layer`` (None without a
        teacher) of the crops at ``index``, on ``device``: ``{"images", "taps", "targets"}``."""
        taps = {layer: self.tokens[layer][index].to(device).float() for layer in layers}
        targets = None
        if self.pooled is not None and semantic_layer in self.tokens:
            tokens = taps[semantic_layer] if semantic_layer in taps else self.tokens[semantic_layer][index].to(device).float()
            targets = TeacherTargets(tokens=tokens, pooled=self.pooled[index].to(device).float())
        return {"images": self.images[index].to(device).float(), "taps": taps, "targets": targets}


def cache_layers(tokenizer: DualTokenizer, config: TrainConfig) -> list[int]:
    """The layers a run's cache holds: the model's taps and ``cache.layers``."""
    return sorted(set(tokenizer.tap_layers()) | set(config.cache.layers))


def check_frozen_below_taps(tokenizer: DualTokenizer) -> None:
    """ConfigError unless no parameter of the tower's layers 0..deepest tap trains (their tokens are cached)."""
    deepest = max(tokenizer.tap_layers())
    parts = tokenizer.backbone.parts()
    if any(p.requires_grad for layer in range(deepest + 1) for p in parts[layer].parameters()):
        raise ConfigError(
            f"cache.taps caches the tower's tokens, but layers 0..{deepest} train: set freeze.preset to stage0"
        )


def _fingerprint(config: TrainConfig, tokenizer: DualTokenizer, ids: list[str], layers: list[int]) -> dict[str, Any]:
    """What a tap cache's contents depend on (a folder made for anything else is refused): the images by their ids
    in reading order, the crops, the layers and the tower's weights up to the deepest of them, the teacher."""
    digest = hashlib.sha256()
    for layer, state in enumerate(states_below_tap(tokenizer.backbone, max(layers))):
        for name in sorted(state):
            digest.update(f"{layer}.{name}".encode())
            digest.update(state[name].float().cpu().numpy().tobytes())
    return {
        "format": CACHE_FORMAT,
        "kind": "taps",
        "images": len(ids),
        "image_ids": hashlib.sha256("\n".join(ids).encode()).hexdigest()[:16],
        "crops_per_image": config.cache.crops_per_image,
        "crop_scale": list(config.data.crop_scale),
        "seed": config.seed,
        "image_size": list(tokenizer.image_size),
        "layers": layers,
        "backbone": to_dict(tokenizer.config.backbone),
        "tower_below_taps": digest.hexdigest()[:16],
        "teacher": config.teacher,
        "dtype": config.cache.dtype,
    }


def build_tap_cache(
    config: TrainConfig, tokenizer: DualTokenizer, teacher, folder: Path, progress: bool = True
) -> TapCache:
    """Compute (or read back) ``cache.crops_per_image`` training crops of every image of ``data.train`` with the
    tower's tokens at :func:`cache_layers` and the teacher's pooled output (shards written atomically: a second
    call resumes). ConfigError when the tower below those layers is not the teacher's."""
    layers = cache_layers(tokenizer, config)
    if teacher is not None:
        mine, theirs = states_below_tap(tokenizer.backbone, max(layers)), states_below_tap(teacher, max(layers))
        if any(a.keys() != b.keys() or any(not torch.equal(a[k].cpu(), b[k].cpu()) for k in a) for a, b in zip(mine, theirs)):
            raise ConfigError(f"cache.taps needs the tower's layers 0..{max(layers)} at the teacher's weights")
    dtype = torch.float16 if config.cache.dtype == "float16" else torch.float32
    device = next(tokenizer.parameters()).device

    @torch.no_grad()
    def features(images: torch.Tensor) -> dict[str, torch.Tensor]:
        images = images.to(device)
        tokens = tokenizer.tap_tokens(images, layers)
        parts = {"images": images, **{f"layer{layer}": tokens[layer] for layer in layers}}
        if teacher is not None:
            parts["pooled"] = teacher_targets(teacher, images, max(layers)).pooled
        return {name: values.to("cpu", dtype) for name, values in parts.items()}

    fingerprint = functools.partial(_fingerprint, config, tokenizer, layers=layers)
    shards = cached_shards(config, tokenizer.image_size, config.data.train, folder, True, fingerprint, features, progress)
    return TapCache(
        images=torch.cat([s["images"] for s in shards]),
        tokens={layer: torch.cat([s[f"layer{layer}"] for s in shards]) for layer in layers},
        pooled=torch.cat([s["pooled"] for s in shards]) if teacher is not None else None,
        ids=[image_id for s in shards for image_id in s["ids"]],
    )
