"""The semantic branch alone, trained on cached tap features of the frozen tower (``branch: "semantic"``).

With the tower frozen below the semantic tap (freeze preset ``stage0``), the semantic branch — down-projection,
residual quantizer, up-projection, and the layers after the tap — sees the same tap tokens for a crop at every
step, whatever the pixel branch and the decoder do. So the tower runs once per training crop: its tokens at the
semantic tap and the teacher's targets go to a feature cache on disk, and training reads the cache. An epoch over
thousands of images then costs seconds to minutes on a CPU instead of an hour.

    crop -> frozen tower 1..semantic_layer -> tap tokens (N, h*w, W)        } cached once
    crop -> teacher -> tokens at semantic_layer, pooled output               }
    tap tokens -> down -> residual quantizer -> up -> features -> layers after the tap -> pooled   (each step)
    loss = distillation(features, pooled; teacher) + semantic_commitment * commitment

The pixel branch and the decoder keep the weights the run starts with (``init_from`` brings trained ones). The
training loop is the engine's (:mod:`dualtoken.training.engine`); :class:`SemanticTask` gives it the model's
semantic path (``forward(tap_tokens, semantic_only=True)``) and the cache as its data. Under torchrun rank 0
computes the cache and every process trains on its share of each batch (DDP).
"""

from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..config import to_dict
from ..errors import ConfigError
from ..evaluation.codebook_stats import code_histogram, usage_stats
from ..evaluation.samples import labels_from_tsv
from ..factory import build_tokenizer
from ..losses import DualTokenObjective, TeacherTargets, teacher_targets
from ..tokenizer import DualTokenizer
from .config import TrainConfig
from .engine import Callback, Engine, ShuffledBatches
from .freeze import apply_freeze
from .monitor import CodebookMonitor
from .tap_cache import CACHE_FORMAT, cached_shards, states_below_tap
from .tasks import TokenizerModelTask, make_teacher

# ----------------------------------------------------------------------------------------------------------------
# the feature cache
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class FeatureCache:
    """Per crop: the tower's tap tokens, the teacher's tokens at the same layer and its pooled output."""

    inputs: torch.Tensor  # (N, h*w, W) what the semantic branch reads
    target_tokens: torch.Tensor  # (N, h*w, W) the teacher's tokens (the same tensor when the towers agree)
    pooled: torch.Tensor  # (N, P) the teacher's pooled output
    ids: list[str]  # "<image id>#<crop>"

    def __len__(self) -> int:
        return self.inputs.shape[0]

    def batch(self, index: torch.Tensor, device: torch.device | None = None) -> tuple[torch.Tensor, TeacherTargets]:
        """Float32 inputs and teacher targets of the crops at ``index``, on ``device`` (default: the cache's)."""
        inputs = self.inputs[index].to(device).float()
        tokens = inputs if self.target_tokens is self.inputs else self.target_tokens[index].to(device).float()
        return inputs, TeacherTargets(tokens=tokens, pooled=self.pooled[index].to(device).float())


@torch.no_grad()
def tap_features(
    tokenizer: DualTokenizer, teacher, images: torch.Tensor, shared_tower: bool = False
) -> tuple[torch.Tensor, TeacherTargets]:
    """The tokenizer's tower tokens at the semantic tap (B, h*w, W) and the teacher's targets for ``images``.
    ``shared_tower``: the tokenizer's tower below the tap is the teacher's, so the teacher's run gives both."""
    layer = tokenizer.config.semantic_layer
    targets = teacher_targets(teacher, images, layer)
    if shared_tower:
        return targets.tokens, targets
    states = tokenizer.backbone.forward_all(images, stop=layer)
    return tokenizer.backbone.to_tokens(layer, states[layer]), targets


def same_tower_below_tap(tokenizer: DualTokenizer, teacher) -> bool:
    """Whether the tokenizer's tower up to the semantic tap has exactly the teacher's weights and buffers."""
    layer = tokenizer.config.semantic_layer
    for a, b in zip(states_below_tap(tokenizer.backbone, layer), states_below_tap(teacher, layer)):
        if a.keys() != b.keys() or any(not torch.equal(a[k].cpu(), b[k].cpu()) for k in a):
            return False
    return True


def _fingerprint(config: TrainConfig, tokenizer: DualTokenizer, ids: list[str], train: bool) -> dict[str, Any]:
    """What a cache's contents depend on; a cache folder made for anything else is refused. The images count by
    their ids in reading order, not by the source's path, so a moved checkout keeps its cache; the tower counts by
    its weights up to the semantic tap, so a run that starts from a trained tail keeps it too."""
    digest = hashlib.sha256()
    for layer, state in enumerate(states_below_tap(tokenizer.backbone, tokenizer.config.semantic_layer)):
        for name in sorted(state):
            digest.update(f"{layer}.{name}".encode())
            digest.update(state[name].float().cpu().numpy().tobytes())
    return {
        "format": CACHE_FORMAT,
        "images": len(ids),
        "image_ids": hashlib.sha256("\n".join(ids).encode()).hexdigest()[:16],
        "train": train,
        "crops_per_image": config.cache.crops_per_image if train else 1,
        "crop_scale": list(config.data.crop_scale) if train else None,
        "seed": config.seed,
        "image_size": list(tokenizer.image_size),
        "semantic_layer": tokenizer.config.semantic_layer,
        "backbone": to_dict(tokenizer.config.backbone),
        "tower_below_tap": digest.hexdigest()[:16],
        "teacher": config.teacher,
        "dtype": config.cache.dtype,
    }


def build_feature_cache(
    config: TrainConfig,
    tokenizer: DualTokenizer,
    teacher,
    spec: str,
    folder: Path,
    train: bool = True,
    progress: bool = True,
) -> FeatureCache:
    """Compute (or read back) the features of every image of ``spec``: ``crops_per_image`` random crops each for
    training, one centre crop otherwise. Shards are written atomically as they finish, so a second call resumes."""
    shared = same_tower_below_tap(tokenizer, teacher)
    teacher.to(memory_format=torch.channels_last)  # faster convolutions on a CPU; same values
    tokenizer.backbone.to(memory_format=torch.channels_last)
    dtype = torch.float16 if config.cache.dtype == "float16" else torch.float32
    device = next(teacher.parameters()).device

    def features(images: torch.Tensor) -> dict[str, torch.Tensor]:
        inputs, targets = tap_features(tokenizer, teacher, images.to(device), shared)
        parts = {"inputs": inputs, "pooled": targets.pooled}
        if not shared:  # otherwise the same tensor as the inputs: keep one copy
            parts["target_tokens"] = targets.tokens
        return {name: values.to("cpu", dtype) for name, values in parts.items()}

    fingerprint = functools.partial(_fingerprint, config, tokenizer, train=train)
    shards = cached_shards(config, tokenizer.image_size, spec, folder, train, fingerprint, features, progress)
    inputs = torch.cat([s["inputs"] for s in shards])
    same = all("target_tokens" not in s for s in shards)
    return FeatureCache(
        inputs=inputs,
        target_tokens=inputs if same else torch.cat([s.get("target_tokens", s["inputs"]) for s in shards]),
        pooled=torch.cat([s["pooled"] for s in shards]),
        ids=[image_id for s in shards for image_id in s["ids"]],
    )


# ----------------------------------------------------------------------------------------------------------------
# evaluation on cached held-out features
# ----------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def evaluate_semantic(
    tokenizer: DualTokenizer, cache: FeatureCache, labels: torch.Tensor | None = None, batch_size: int = 64
) -> dict[str, float]:
    """Per prefix depth k (the first k codes): token cosine to the teacher (``token_cosine@k``), agreement of the
    pooled argmax with the teacher's, top-1 / top-5 accuracy when ``labels`` (N,) are given (-1: unknown); code
    usage and perplexity per depth d (``semantic/depth<d>/usage``, d from 0, the training records' names)."""
    branch = tokenizer.semantic
    quantizer = branch.quantizer
    depth = quantizer.depth
    device = quantizer.codebook.device
    labels = None if labels is None else labels.to(device)
    sums: dict[str, float] = {}
    counts = torch.zeros(depth, quantizer.codebook_size, dtype=torch.long)
    for start in range(0, len(cache), batch_size):
        index = torch.arange(start, min(start + batch_size, len(cache)))
        inputs, targets = cache.batch(index, device)
        codes = quantizer(branch.down(inputs), update=False).codes  # (B, h*w, Q)
        counts += code_histogram(codes.unsqueeze(1).cpu(), quantizer.codebook_size)
        for k in range(1, depth + 1):
            features = branch.up(quantizer.decode(codes[..., :k]))  # (B, h*w, W)
            pooled = tokenizer.pool_from_features(features)
            cosine = torch.nn.functional.cosine_similarity(features, targets.tokens, dim=-1).mean(dim=-1)
            agree = (pooled.argmax(-1) == targets.pooled.argmax(-1)).float()
            _accumulate(sums, f"token_cosine@{k}", cosine)
            _accumulate(sums, f"teacher_agreement@{k}", agree)
            if labels is not None:
                known = labels[index] >= 0
                top5 = pooled.topk(5, dim=-1).indices
                _accumulate(sums, f"top1@{k}", (top5[:, 0] == labels[index]).float()[known])
                _accumulate(sums, f"top5@{k}", (top5 == labels[index, None]).any(-1).float()[known])
        if labels is not None:
            known = labels[index] >= 0
            _accumulate(sums, "teacher_top1", (targets.pooled.argmax(-1) == labels[index]).float()[known])
    metrics = {name: total / sums[f"n:{name}"] for name, total in sums.items() if not name.startswith("n:")}
    for k in range(depth):
        stats = usage_stats(counts[k])
        metrics[f"semantic/depth{k}/usage"] = stats["usage"]
        metrics[f"semantic/depth{k}/perplexity"] = stats["perplexity"]
    return metrics


def _accumulate(sums: dict[str, float], name: str, values: torch.Tensor) -> None:
    sums[name] = sums.get(name, 0.0) + float(values.sum())
    sums[f"n:{name}"] = sums.get(f"n:{name}", 0.0) + values.numel()


def cache_labels(cache: FeatureCache, spec: str) -> torch.Tensor | None:
    """Class indices (N,) of a cache's crops when ``spec`` is a TSV with ``file`` and ``class_index``; -1 unknown."""
    path = Path(spec)
    if path.suffix.lower() != ".tsv" or "class_index" not in path.read_text().splitlines()[0].split("\t"):
        return None
    _, by_file = labels_from_tsv(path)
    return torch.tensor([by_file.get(image_id.rsplit("#", 1)[0], -1) for image_id in cache.ids])


# ----------------------------------------------------------------------------------------------------------------
# the task
# ----------------------------------------------------------------------------------------------------------------


class SemanticTask(TokenizerModelTask):
    """The semantic branch (and the tower's tail unless ``freeze.tail``) on cached tap features: the loss is the
    distillation terms plus ``loss.semantic_commitment`` x the commitment. At the end of a finished run the
    held-out cache (``data.eval``) is scored per depth into ``semantic_eval.json`` and an ``eval`` record."""

    name = "semantic"

    def __init__(self, engine: Engine) -> None:
        config: TrainConfig = engine.config
        runtime = engine.runtime
        self.engine, self.config = engine, config
        if config.codebook_init.method != "random":
            raise ConfigError('codebook_init.method applies to the pixel codebook, which branch "semantic" never trains')
        if config.data.eval_image_size is not None:
            raise ConfigError('data.eval_image_size does not apply to branch "semantic" (cached features)')
        if runtime.distributed and config.parallel == "fsdp":
            raise ConfigError('parallel=fsdp does not apply to branch "semantic" (its model is small): use ddp')
        tokenizer = build_tokenizer(config)
        teacher = make_teacher(tokenizer, config.teacher, runtime.device)
        tokenizer.to(runtime.device)
        apply_freeze(tokenizer, config.freeze)
        for module in (tokenizer.pixel, tokenizer.pixel_shortcut, tokenizer.decoder):
            if module is not None:
                module.requires_grad_(False)
        tokenizer.backbone.set_gradient_checkpointing(config.gradient_checkpointing)
        self.model = self.tokenizer = tokenizer
        self.objective = DualTokenObjective(config.loss)
        root = Path(config.cache.folder) if config.cache.folder else Path(config.output_dir) / "features"
        train_cache = self._cache(teacher, config.data.train, root / "train", True)
        self.data = ShuffledBatches(
            len(train_cache), config.data.batch_size, config.seed, runtime,
            lambda index, epoch: train_cache.batch(index, runtime.device),  # (inputs, targets)
        )
        self.samples_per_batch = self.data.batch_size
        depth = {"semantic": tokenizer.semantic_depth}
        self.usage = CodebookMonitor({"semantic": tokenizer.codebook_size("semantic")}, depth, runtime.device)
        self.callbacks = [self.usage]
        if config.data.eval:
            eval_cache = self._cache(teacher, config.data.eval, root / "eval", False)
            self.callbacks.append(HeldOutFeatures(self, eval_cache, cache_labels(eval_cache, config.data.eval)))

    def _cache(self, teacher, spec: str, folder: Path, train: bool) -> FeatureCache:
        """Rank 0 computes the features; the other ranks read its shards back."""
        runtime, progress = self.engine.runtime, self.config.log.progress
        if runtime.is_main:
            cache = build_feature_cache(self.config, self.tokenizer, teacher, spec, folder, train, progress)
        runtime.barrier()
        if not runtime.is_main:
            cache = build_feature_cache(self.config, self.tokenizer, teacher, spec, folder, train, False)
        return cache

    def train_mode(self) -> None:
        self.tokenizer.train()
        self.tokenizer.pixel.eval()  # the pixel codebook keeps its state: this task never quantizes pixels

    def loss(self, model: nn.Module, batch) -> tuple[torch.Tensor, dict[str, float]]:
        inputs, targets = batch
        out = model(inputs, semantic_only=True)
        loss, terms = self.objective.distillation(out.features, out.pooled, targets)
        loss = loss + self.config.loss.semantic_commitment * out.commitment
        self.usage.update("semantic", out.codes.unsqueeze(1))
        scalars = {name: float(value.detach()) for name, value in terms.items()}
        scalars["semantic_commitment"] = float(out.commitment.detach())
        return loss, scalars



class HeldOutFeatures(Callback):
    """The semantic evaluation of the held-out cache every ``log.eval_every`` steps and at the end of a finished
    run (then also into ``<output_dir>/semantic_eval.json``)."""

    def __init__(self, task: SemanticTask, cache: FeatureCache, labels: torch.Tensor | None) -> None:
        self.task, self.cache, self.labels = task, cache, labels

    def _evaluate(self, engine: Engine) -> dict[str, float]:
        tokenizer = self.task.tokenizer
        tokenizer.eval()
        results = evaluate_semantic(tokenizer, self.cache, self.labels)
        self.task.train_mode()
        engine.log_eval(results)
        return results

    def on_step_end(self, engine: Engine, last: bool) -> None:
        every = engine.config.log.eval_every
        if every and engine.step % every == 0 and engine.step < engine.config.max_steps:
            self._evaluate(engine)

    def on_end(self, engine: Engine, finished: bool) -> None:
        if finished:
            results = self._evaluate(engine)
            if engine.runtime.is_main:
                (engine.out_dir / "semantic_eval.json").write_text(json.dumps(results, indent=2) + "\n")
