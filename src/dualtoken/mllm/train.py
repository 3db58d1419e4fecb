"""MLLM training: a task of the training engine (:mod:`dualtoken.training.engine`), which gives it one process or
torchrun (DDP, or FSDP2 ``fully_shard`` per LLM decoder layer and per visual head), AdamW + warm-up/cosine, atomic
keep-last-N resume checkpoints with every rank's RNG and data position, and console / JSONL / TensorBoard metrics.

Presets (docs/METHOD.md "MLLM training stages") choose what trains: ``align`` the input fusion, ``understanding`` fusion + LLM, ``generation``
the visual heads, ``full`` all three. The DualToken tokenizer never trains. LoRA (peft) replaces full LLM training.
The data position is checkpointed (a seeded permutation per epoch), so a resumed run sees the same batches.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from ..errors import ConfigError
from ..training.distributed import Runtime
from ..training.engine import Engine, ShuffledBatches, Task
from .config import PRESETS, MLLMTrainConfig, locate
from .data import (
    CaptionRecord,
    ConversationRecord,
    MLLMDataset,
    TokenCache,
    collate,
    read_captions,
    read_conversations,
)
from .model import DualTokenMLLM


def set_trainable(model: DualTokenMLLM, preset: str, lora: bool) -> list[str]:
    """Freeze everything, then unfreeze what ``preset`` trains; returns the names of the trainable parameters."""
    groups = PRESETS[preset]
    if lora and "llm" not in groups:
        raise ConfigError(
            f"lora.enabled needs a preset that trains the LLM ('understanding' or 'full'), not {preset!r}"
        )
    model.requires_grad_(False)
    if "fusion" in groups:
        model.fusion.requires_grad_(True)
        model.code_tables.requires_grad_(model.config.fusion.train_code_embeddings)
    if "heads" in groups:
        model.pixel_head.requires_grad_(True)
        model.semantic_head.requires_grad_(True)
    if "llm" in groups:
        if lora:
            for name, param in model.llm.named_parameters():
                param.requires_grad_("lora_" in name)
        else:
            model.llm.requires_grad_(True)
    return [name for name, param in model.named_parameters() if param.requires_grad]


def build_dataset(model: DualTokenMLLM, config: MLLMTrainConfig, base_dir: str | Path | None) -> MLLMDataset:
    data = config.data
    cache = TokenCache(locate(s, base_dir) for s in data.token_cache)
    tok = model.visual_tokenizer
    cache.check_compatible(
        tok.grid,
        (model.depths["pixel"], model.depths["semantic"]),
        (tok.codebook_size("pixel"), tok.codebook_size("semantic")),
    )
    records: list[ConversationRecord | CaptionRecord] = []
    for path in data.conversations:
        records += read_conversations(locate(path, base_dir), model.config.prompt.image_placeholder)
    for source in data.captions:
        records += read_captions(locate(source, base_dir))
    return MLLMDataset(records, cache, model.prompt, data.condition_dropout, data.max_length, config.seed)


def build_model(config: MLLMTrainConfig, base_dir: str | Path | None) -> DualTokenMLLM:
    """The model to train, seeded so that every rank and every resume rebuilds the same initial weights."""
    torch.manual_seed(config.seed)
    if config.init_from is not None:
        model = DualTokenMLLM.from_pretrained(locate(config.init_from, base_dir))
    else:
        model = DualTokenMLLM.from_config(config.model, base_dir=base_dir)
    if config.lora.enabled:
        model.enable_lora(config.lora)
    return model


def shard(model: DualTokenMLLM, runtime: Runtime) -> DualTokenMLLM:
    """FSDP2: one unit per LLM decoder layer (the classes transformers lists in ``_no_split_modules``), one per
    visual head (its ``losses`` method unshards like ``forward``), then the root (embeddings, LM head, input
    fusion, code tables, the frozen tokenizer)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    mesh = init_device_mesh(runtime.device.type, (runtime.world_size,))
    llm = model.llm.get_base_model() if hasattr(model.llm, "get_base_model") else model.llm  # under LoRA: peft's
    layer_classes = set(getattr(llm, "_no_split_modules", None) or [])
    for module in model.llm.modules():
        if type(module).__name__ in layer_classes:
            fully_shard(module, mesh=mesh)
    for head in (model.pixel_head, model.semantic_head):
        fully_shard(head, mesh=mesh)
        register_fsdp_forward_method(head, "losses")  # training calls head.losses, not forward
    fully_shard(model, mesh=mesh)
    return model


class MLLMTask(Task):
    """The MLLM as an engine task: the preset's parameters train on conversations and captions; the loss is the
    model's (text + visual heads), logged as ``loss``, ``text``, ``pixel``, ``semantic`` and per-depth terms."""

    name = "mllm"

    def __init__(self, engine: Engine, base_dir: str | Path | None = None) -> None:
        config: MLLMTrainConfig = engine.config
        self.config, self.base_dir = config, base_dir
        self.model = build_model(config, base_dir)
        set_trainable(self.model, config.preset, config.lora.enabled)
        self.model.to(engine.runtime.device).train()
        dataset = build_dataset(self.model, config, base_dir)
        device, pad_id = engine.runtime.device, self.model.pad_id

        def fetch(indices: torch.Tensor, epoch: int):
            return collate([dataset.item(int(index), epoch) for index in indices], pad_id).to(device)

        self.data = ShuffledBatches(len(dataset), config.data.batch_size, config.seed, engine.runtime, fetch)
        self.samples_per_batch = self.data.batch_size
        self.callbacks = []
        if engine.runtime.is_main:
            count = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
            tqdm.write(f"mllm: {len(dataset)} samples, {count:,} trainable parameters ({config.preset})")

    def wrap(self, runtime: Runtime, parallel: str) -> torch.nn.Module:
        return shard(self.model, runtime) if runtime.distributed and parallel == "fsdp" else super().wrap(runtime, parallel)

    def loss(self, model: torch.nn.Module, batch) -> tuple[torch.Tensor, dict[str, float]]:
        losses = model(batch)
        return losses.loss, {k: v for k, v in losses.scalars().items() if k != "loss"}

    def export(self, path: Path, model: torch.nn.Module) -> Path:
        model.save_pretrained(path)  # LoRA merged
        return path

    def fresh_model(self) -> torch.nn.Module:
        return build_model(self.config, self.base_dir)


def mllm_engine(config: MLLMTrainConfig, base_dir: str | Path | None = None) -> Engine:
    """The training engine with the MLLM task (relative paths of ``config`` are taken from ``base_dir``)."""
    return Engine(config, lambda engine: MLLMTask(engine, base_dir))


def train_mllm(
    config: MLLMTrainConfig, base_dir: str | Path | None = None, progress: bool = True, stop_at: int | None = None
) -> dict[str, Any]:
    """Run (or resume) training; returns the engine's summary (``export``: ``output_dir/final``, the
    save_pretrained folder written when the run finished; None when ``stop_at`` ended it first, resumably)."""
    if not progress:
        config = dataclasses.replace(config, log=dataclasses.replace(config.log, progress=False))
    return mllm_engine(config, base_dir).run(stop_at)
