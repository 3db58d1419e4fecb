"""MLLM training on the tokenizer trainer's machinery (:mod:`dualtoken.training`): one process or torchrun
(DDP, or FSDP2 ``fully_shard`` per LLM decoder layer and per visual head), AdamW + warm-up/cosine, atomic
keep-last-N resume checkpoints with every rank's RNG, and console / JSONL / TensorBoard metrics.

Presets (docs/METHOD.md "MLLM training stages") choose what trains: ``align`` the input fusion, ``understanding`` fusion + LLM, ``generation``
the visual heads, ``full`` all three. The DualToken tokenizer never trains. LoRA (peft) replaces full LLM training.
The data position follows from the step (a seeded permutation per epoch), so a resumed run sees the same batches.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from tqdm import tqdm

from ..config import to_dict
from ..errors import ConfigError
from ..training import checkpoints
from ..training.distributed import (
    Runtime,
    full_model_state,
    full_optimizer_state,
    gather_objects,
    gradient_sync,
    load_model_state,
    load_optimizer_state,
    resolve_precision,
    setup_runtime,
    unwrap,
    wrap_model,
)
from ..training.metrics import MetricsLogger
from ..training.optim import build_optimizer, build_scheduler, optimizer_step
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

CHECKPOINTS = "checkpoints"


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
        (tok.pixel_depth, tok.semantic_depth),
        (tok.codebook_size("pixel"), tok.codebook_size("semantic")),
    )
    records: list[ConversationRecord | CaptionRecord] = []
    for path in data.conversations:
        records += read_conversations(locate(path, base_dir), model.config.prompt.image_placeholder)
    for source in data.captions:
        records += read_captions(locate(source, base_dir))
    return MLLMDataset(records, cache, model.prompt, data.condition_dropout, data.max_length, config.seed)


def sample_indices(dataset_size: int, start: int, count: int, seed: int) -> list[tuple[int, int]]:
    """(epoch, index) of global sample positions start..start+count-1: a fresh permutation per epoch."""
    out, permutations = [], {}
    for position in range(start, start + count):
        epoch = position // dataset_size
        if epoch not in permutations:
            permutations[epoch] = torch.randperm(
                dataset_size, generator=torch.Generator().manual_seed(seed + epoch)
            )
        out.append((epoch, int(permutations[epoch][position % dataset_size])))
    return out


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
    visual head, then the root (embeddings, LM head, input fusion, code tables, the frozen tokenizer)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(runtime.device.type, (runtime.world_size,))
    layer_classes = set(getattr(unwrap_peft(model.llm), "_no_split_modules", None) or [])
    for module in model.llm.modules():
        if type(module).__name__ in layer_classes:
            fully_shard(module, mesh=mesh)
    fully_shard(model.pixel_head, mesh=mesh)
    fully_shard(model.semantic_head, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def unwrap_peft(llm: torch.nn.Module) -> torch.nn.Module:
    return llm.get_base_model() if hasattr(llm, "get_base_model") else llm


class MLLMTrainer:
    """One run: model, data, optimiser, schedule and checkpoints, on this process's share of the batch."""

    def __init__(self, config: MLLMTrainConfig, base_dir: str | Path | None = None) -> None:
        self.config = config
        self.base_dir = base_dir
        self.runtime = setup_runtime(config.device)
        self.out_dir = Path(config.output_dir)
        self.autocast_dtype = resolve_precision(config.precision, self.runtime.device)
        self.scaler = torch.amp.GradScaler(self.runtime.device.type, enabled=self.autocast_dtype == torch.float16)
        self.model = build_model(config, base_dir)
        self.trainable = set_trainable(self.model, config.preset, config.lora.enabled)
        self.model.to(self.runtime.device).train()
        self.dataset = build_dataset(self.model, config, base_dir)
        self.pad_id = self.model.pad_id
        if self.runtime.distributed and config.parallel == "fsdp":
            self.engine = shard(self.model, self.runtime)
        else:
            self.engine = wrap_model(self.model, self.runtime, "ddp", find_unused=True)
        self.optimizer = build_optimizer(self.engine, config.optimizer)
        self.scheduler = build_scheduler(self.optimizer, config.max_steps, config.optimizer)
        self.step = 0
        if config.checkpoint.resume:
            self._resume()
        torch.manual_seed(
            config.seed + self.runtime.rank + 1000 * self.step
        )  # dropout: per rank, reproducible

    # ------------------------------------------------------------------------------------------------------------
    # checkpoints
    # ------------------------------------------------------------------------------------------------------------

    def _resume(self) -> None:
        found = checkpoints.load_latest_checkpoint(self.out_dir / CHECKPOINTS)
        if found is None:
            return
        _, state = found
        load_model_state(self.engine, state["model"], self.config.parallel, self.runtime)
        load_optimizer_state(
            self.engine, self.optimizer, state["optimizer"], self.config.parallel, self.runtime
        )
        self.scheduler.load_state_dict(state["scheduler"])
        if "scaler" in state:
            self.scaler.load_state_dict(state["scaler"])
        self.step = state["step"]
        rng = state["rng"]
        checkpoints.set_rng_state(rng[self.runtime.rank] if self.runtime.rank < len(rng) else rng[0])

    def save_checkpoint(self) -> None:
        parallel, runtime = self.config.parallel, self.runtime
        state = {
            "step": self.step,
            "model": full_model_state(self.engine, parallel, runtime),
            "optimizer": full_optimizer_state(self.engine, self.optimizer, parallel, runtime),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "rng": gather_objects(checkpoints.rng_state(), runtime),
        }
        if runtime.is_main:
            keep = self.config.checkpoint.keep_last
            checkpoints.save_checkpoint(self.out_dir / CHECKPOINTS, self.step, state, keep)
        runtime.barrier()

    def export(self, path: Path) -> None:
        """The whole MLLM with ``save_pretrained`` (rank 0 writes; LoRA merged)."""
        state = full_model_state(self.engine, self.config.parallel, self.runtime)
        if self.runtime.is_main:
            model = unwrap(self.engine)
            if self.runtime.distributed and self.config.parallel == "fsdp":
                model = build_model(self.config, self.base_dir)
                model.load_state_dict(state)
            model.save_pretrained(path)
        self.runtime.barrier()

    # ------------------------------------------------------------------------------------------------------------
    # the steps
    # ------------------------------------------------------------------------------------------------------------

    def _micro_batch(self, micro: int):
        cfg, runtime = self.config, self.runtime
        batch_size = cfg.data.batch_size
        first = ((self.step * cfg.grad_accum + micro) * runtime.world_size + runtime.rank) * batch_size
        positions = sample_indices(len(self.dataset), first, batch_size, cfg.seed)
        items = [self.dataset.item(index, epoch) for epoch, index in positions]
        return collate(items, self.pad_id).to(runtime.device)

    def train_step(self) -> dict[str, float]:
        """One optimiser step of ``grad_accum`` micro-steps; gradients are all-reduced on the last one only."""
        cfg, device = self.config, self.runtime.device
        totals: dict[str, float] = {}
        for micro in range(cfg.grad_accum):
            with gradient_sync(self.engine, micro + 1 == cfg.grad_accum):
                with torch.autocast(device.type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None):
                    losses = self.engine(self._micro_batch(micro))
                self.scaler.scale(losses.loss / cfg.grad_accum).backward()
            for key, value in losses.scalars().items():
                totals[key] = totals.get(key, 0.0) + value / cfg.grad_accum
        totals["lr"], grad_norm = optimizer_step(self.optimizer, self.scheduler, self.scaler, cfg.optimizer.grad_clip)
        if cfg.optimizer.grad_clip > 0:
            totals["grad_norm"] = grad_norm
        self.step += 1
        return totals

    def run(self, progress: bool = True, stop_after: int | None = None) -> Path:
        cfg, runtime = self.config, self.runtime
        end = cfg.max_steps if stop_after is None else min(cfg.max_steps, self.step + stop_after)
        logger = MetricsLogger(self.out_dir, cfg.log, enabled=runtime.is_main, resume_step=self.step)
        if runtime.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            (self.out_dir / "train_config.json").write_text(json.dumps(to_dict(cfg), indent=2) + "\n")
            trainable = set(self.trainable)
            count = sum(p.numel() for n, p in self.model.named_parameters() if n in trainable)
            tqdm.write(
                f"mllm: {len(self.dataset)} samples, {count:,} trainable parameters ({cfg.preset}), "
                f"steps {self.step}..{end} of {cfg.max_steps}, {runtime.world_size} process(es) on {runtime.device}"
            )
        bar = tqdm(
            total=cfg.max_steps,
            initial=self.step,
            disable=not (progress and cfg.log.progress and runtime.is_main),
            desc="train-mllm",
        )
        tick, samples = time.perf_counter(), 0
        while self.step < end:
            values = self.train_step()
            samples += cfg.data.batch_size * cfg.grad_accum * runtime.world_size
            bar.update(1)
            if self.step % cfg.log.every == 0 or self.step == end:
                values["samples_per_s"] = samples / (time.perf_counter() - tick)
                logger.log(self.step, values)
                bar.set_postfix(loss=f"{values['loss']:.3f}", text=f"{values['text']:.3f}")
                tick, samples = time.perf_counter(), 0
            if self.step % cfg.checkpoint.every == 0 or self.step == end:
                self.save_checkpoint()
            if cfg.checkpoint.export_every and self.step % cfg.checkpoint.export_every == 0:
                self.export(self.out_dir / f"export-{self.step:08d}")
        bar.close()
        logger.close()
        final = self.out_dir / "final"
        if self.step >= cfg.max_steps:
            self.export(final)
        return final


def train_mllm(
    config: MLLMTrainConfig,
    base_dir: str | Path | None = None,
    progress: bool = True,
    stop_after: int | None = None,
) -> Path:
    """Run (or resume) training; returns ``output_dir/final``, the save_pretrained folder written after the last step.

    ``stop_after`` ends this invocation (with a checkpoint) after that many steps, for time-boxed sessions; the
    schedule still spans ``config.max_steps``, and the next call resumes.
    """
    trainer = MLLMTrainer(config, base_dir)
    try:
        return trainer.run(progress, stop_after)
    finally:
        trainer.runtime.close()
