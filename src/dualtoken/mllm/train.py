"""MLLM training: one loop for a single process and for torchrun (DDP), resumable, logged.

Presets (SPEC 5.5) choose what trains: ``align`` the input fusion, ``understanding`` fusion + LLM, ``generation``
the visual heads, ``full`` all three. The DualToken tokenizer never trains. LoRA (peft) replaces full LLM training.
Checkpoints hold the trainable weights, optimiser, schedule, step and RNG; the frozen weights are rebuilt
deterministically from the config (seeded), so a resumed run continues exactly.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import time
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

from ..config import to_dict
from ..errors import ConfigError
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


def build_optimizer(model: DualTokenMLLM, config: MLLMTrainConfig) -> torch.optim.AdamW:
    """AdamW; weight decay only on trainable parameters with >= 2 dims."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    opt = config.optim
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": opt.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=opt.lr,
        betas=opt.betas,
    )


def lr_factor(step: int, total: int, warmup_ratio: float, min_ratio: float) -> float:
    """Linear warm-up over ``warmup_ratio·total`` steps, then cosine from 1 to ``min_ratio``."""
    warmup = max(1, round(warmup_ratio * total))
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


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


def _indices(dataset_size: int, start: int, count: int, seed: int) -> list[tuple[int, int]]:
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


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _save_checkpoint(
    out_dir: Path, step: int, model, optimizer, scheduler, keep_last: int, rank: int
) -> None:
    """Rank 0 writes ``checkpoints/step-N.pt`` atomically (temp + rename), then drops all but the newest few."""
    folder = out_dir / CHECKPOINTS
    folder.mkdir(parents=True, exist_ok=True)
    rng = [None] * dist.get_world_size() if dist.is_initialized() else None
    if rng is not None:
        dist.all_gather_object(rng, _rng_state())
    if rank != 0:
        return
    state = {
        "step": step,
        "trainable": {n: p.detach().cpu() for n, p in model.named_parameters() if p.requires_grad},
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "rng": rng if rng is not None else [_rng_state()],
    }
    path = folder / f"step-{step:08d}.pt"
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    torch.save(state, tmp)
    os.replace(tmp, path)
    for old in sorted(folder.glob("step-*.pt"))[:-keep_last]:
        old.unlink()


def _resume(out_dir: Path, model, optimizer, scheduler, rank: int) -> int:
    """Load the newest checkpoint if any; returns the step to continue from."""
    checkpoints = sorted((out_dir / CHECKPOINTS).glob("step-*.pt"))
    if not checkpoints:
        return 0
    state = torch.load(checkpoints[-1], map_location="cpu", weights_only=False)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in state["trainable"].items():
            params[name].copy_(value)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    rng = state["rng"]
    _set_rng_state(rng[rank] if rank < len(rng) else rng[0])
    return state["step"]


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def train_mllm(
    config: MLLMTrainConfig,
    base_dir: str | Path | None = None,
    progress: bool = True,
    stop_after: int | None = None,
) -> Path:
    """Run (or resume) training; returns the folder of the final model (``out_dir/final``, save_pretrained,
    written when the last step is done).

    ``stop_after`` ends this invocation (with a checkpoint) after that many steps, for time-boxed sessions; the
    schedule still spans ``config.steps``, and the next call resumes.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    rank = dist.get_rank() if dist.is_initialized() else 0
    device = _device(config.device)
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    out_dir = Path(locate(config.out_dir, None))
    out_dir.mkdir(parents=True, exist_ok=True)

    torch.manual_seed(config.seed)  # the same frozen weights on every rank and every resume
    if config.init_from is not None:
        model = DualTokenMLLM.from_pretrained(locate(config.init_from, base_dir))
    else:
        model = DualTokenMLLM.from_config(config.model, base_dir=base_dir)
    if config.lora.enabled:
        model.enable_lora(config.lora)
    trainable = set_trainable(model, config.preset, config.lora.enabled)
    model.to(device).train()
    dataset = build_dataset(model, config, base_dir)
    optimizer = build_optimizer(model, config)
    opt = config.optim
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, config.steps, opt.warmup_ratio, opt.min_lr_ratio)
    )
    start = _resume(out_dir, model, optimizer, scheduler, rank)
    torch.manual_seed(config.seed + rank + 1000 * start)  # dropout differs per rank, reproducible on resume
    engine = model
    if dist.is_initialized():
        engine = torch.nn.parallel.DistributedDataParallel(model, find_unused_parameters=True)
    if rank == 0:
        (out_dir / "train_config.json").write_text(json.dumps(to_dict(config), indent=2) + "\n")
        print(
            f"mllm: {len(dataset)} samples, {sum(model.get_parameter(n).numel() for n in trainable):,} trainable "
            f"parameters ({config.preset}), steps {start}..{config.steps}, world {world}, device {device}"
        )

    per_micro = config.batch_size * world
    log = (out_dir / "metrics.jsonl").open("a") if rank == 0 else None
    bar = tqdm(total=config.steps, initial=start, disable=not progress or rank != 0, desc="train-mllm")
    params = [p for p in model.parameters() if p.requires_grad]
    tick, samples = time.perf_counter(), 0
    end = config.steps if stop_after is None else min(config.steps, start + stop_after)
    for step in range(start, end):
        totals: dict[str, float] = {}
        for micro in range(config.grad_accum):
            first = (step * config.grad_accum + micro) * per_micro + rank * config.batch_size
            items = [
                dataset.item(i, epoch)
                for epoch, i in _indices(len(dataset), first, config.batch_size, config.seed)
            ]
            batch = collate(items, model.pad_id).to(device)
            sync = micro + 1 == config.grad_accum or not dist.is_initialized()
            with engine.no_sync() if not sync else contextlib.nullcontext():
                with torch.autocast(
                    device.type, dtype=torch.bfloat16, enabled=config.bf16 and device.type == "cuda"
                ):
                    losses = engine(batch)
                (losses.loss / config.grad_accum).backward()
            for key, value in losses.scalars().items():
                totals[key] = totals.get(key, 0.0) + value / config.grad_accum
            samples += config.batch_size * world
        if opt.grad_clip > 0:
            totals["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(params, opt.grad_clip))
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        bar.update(1)
        done = step + 1
        if log is not None and (done % config.log_every == 0 or done == config.steps):
            elapsed = time.perf_counter() - tick
            record = {
                "step": done,
                "lr": scheduler.get_last_lr()[0],
                **totals,
                "samples_per_s": samples / elapsed,
            }
            log.write(json.dumps(record) + "\n")
            log.flush()
            bar.set_postfix(
                loss=f"{totals['loss']:.3f}", text=f"{totals['text']:.3f}", pix=f"{totals['pixel']:.3f}"
            )
            tick, samples = time.perf_counter(), 0
        if done % config.save_every == 0 or done == end:
            _save_checkpoint(out_dir, done, model, optimizer, scheduler, config.keep_last, rank)
    bar.close()
    final = out_dir / "final"
    if rank == 0:
        log.close()
        if end == config.steps:
            model.save_pretrained(final)
    if dist.is_initialized():
        dist.barrier()
    return final
