"""The training engine: one loop for every task (the tokenizer, its pixel or semantic branch alone, the MLLM).

It owns the runtime (one process, torchrun DDP / FSDP2), seeding and ``deterministic`` mode, precision, gradient
accumulation (all-reduce on the last micro-step), the optimiser step, the end of a run (``max_steps``,
``max_seconds``, ``stop_at``), one checkpoint format and resume protocol, exports and the records, whose names are
one vocabulary (docs/TRAINING.md "Metrics"). A :class:`Task` gives the model, its data and ``loss(model, batch) ->
(loss, scalars)``; :class:`Callback` objects add the rest (a discriminator step, held-out evaluation, code usage)::

    for each of grad_accum micro-batches:  loss, scalars = task.loss(model, batch)  -> backward (sync on the last)
    optimizer_step (unscale, clip, step, schedule)  -> callbacks' after_optimizer_step (e.g. the discriminator)
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import resource
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from ..config import to_dict
from ..errors import CheckpointError, DataError
from ..precision import autocast_dtype
from ..process_group import broadcast_object, gather_objects
from . import checkpoints
from .distributed import (
    Runtime,
    full_model_state,
    full_optimizer_state,
    gradient_sync,
    load_model_state,
    load_optimizer_state,
    setup_runtime,
    unwrap,
    wrap_model,
)
from .metrics import MetricsLogger
from .optim import build_optimizer, build_scheduler, optimizer_step

CHECKPOINT_FORMAT = 2  # 1: the tokenizer trainer's before the engine (not read back)


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory of this process so far: CUDA allocations on a GPU, resident set size on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10


class Callback:
    """What a task adds to the loop; every hook is optional (transformers' ``TrainerCallback`` pattern)."""

    def on_ready(self, engine: Engine) -> None:
        """At the end of the engine's construction: resumed (``engine.resumed_from``) or freshly seeded."""

    def on_start(self, engine: Engine) -> None:
        """Before the first step of this process (after resume: ``engine.resumed_from`` says which)."""

    def on_step_begin(self, engine: Engine) -> None:
        """Before the micro-steps of step ``engine.step + 1``."""

    def after_optimizer_step(self, engine: Engine) -> dict[str, float]:
        """After the model's optimiser step: more scalars for the step's record (e.g. a discriminator update)."""
        return {}

    def on_step_end(self, engine: Engine, last: bool) -> None:
        """After step ``engine.step`` (``last``: the final step of this call); cadenced records go here."""

    def on_checkpoint(self, engine: Engine, path: Path | None) -> None:
        """After a checkpoint was written (``path`` on rank 0, None elsewhere)."""

    def on_end(self, engine: Engine, finished: bool) -> None:
        """After the loop (``finished``: the run reached ``max_steps`` or ``max_seconds``), before the final export."""

    def state_dict(self) -> dict[str, Any]:
        """Extra state to checkpoint (rank 0's is saved; every rank loads it)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


class Task:
    """What the engine trains. Subclasses set ``name``, ``model`` (the module that trains, is checkpointed and is
    exported) and ``data`` (an iterator of batches with ``state_dict`` / ``load_state_dict``), and implement
    :meth:`loss` and :meth:`export`."""

    name = "task"
    model: nn.Module
    data: Iterator[Any]
    callbacks: list[Callback]
    samples_per_batch: int = 1  # samples of one micro-batch on one process (for samples_per_s)

    def wrap(self, runtime: Runtime, parallel: str) -> nn.Module:
        """The module the loop calls: the model itself in one process, or its DDP / FSDP2 form."""
        return wrap_model(self.model, runtime, parallel, find_unused=True)

    def parameter_groups(self) -> list[tuple[nn.Module, float]]:
        """Modules whose parameters step at a scaled learning rate (e.g. a pretrained tail)."""
        return []

    def train_mode(self) -> None:
        self.model.train()

    def loss(self, model: nn.Module, batch: Any) -> tuple[torch.Tensor, dict[str, float]]:
        """The objective of one micro-batch (a scalar tensor to backpropagate) and its logged parts."""
        raise NotImplementedError

    def export(self, path: Path, model: nn.Module) -> Path:
        """Write ``model`` (this task's model, or an equal copy holding the full weights) as a model folder."""
        raise NotImplementedError

    def fresh_model(self) -> nn.Module:
        """A new model of the same configuration on the CPU (the full-weight copy an FSDP export loads)."""
        raise NotImplementedError


class ShuffledBatches:
    """A task's data over ``count`` indexed items: each epoch visits them in a new seeded order, process ``rank`` of
    ``world_size`` takes its share of each global batch (the rest of an epoch that fills no global batch is left
    out), and ``fetch(indices, epoch)`` makes the micro-batch. The position is the number of batches handed out."""

    def __init__(self, count: int, batch_size: int, seed: int, runtime: Runtime, fetch) -> None:
        self.count, self.seed, self.runtime, self.fetch = count, seed, runtime, fetch
        self.batch_size = min(batch_size, count // runtime.world_size)
        if self.batch_size < 1:
            raise DataError(f"{count} training items cannot feed {runtime.world_size} processes")
        self.per_epoch = count // (self.batch_size * runtime.world_size)
        self.batches = 0

    @property
    def epoch(self) -> int:
        return self.batches // self.per_epoch

    def __iter__(self) -> ShuffledBatches:
        return self

    def __next__(self) -> Any:
        epoch = self.epoch
        order = torch.randperm(self.count, generator=torch.Generator().manual_seed(self.seed * 100003 + epoch))
        start = ((self.batches % self.per_epoch) * self.runtime.world_size + self.runtime.rank) * self.batch_size
        self.batches += 1
        return self.fetch(order[start : start + self.batch_size], epoch)

    def state_dict(self) -> dict[str, int]:
        return {"batches": self.batches}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.batches = int(state["batches"])


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def deterministic_settings() -> Callable[[], None]:
    """Bitwise-repeatable runs: one intra-op thread (a float sum split over threads rounds differently with each
    split), MKL's conditional numerical reproducibility (its matrix products otherwise take code paths by the memory
    alignment of their operands; read when MKL first runs, so a process that multiplied matrices before keeps its
    setting), deterministic kernels (``index_add_`` / scatter on CUDA), cuBLAS's fixed workspace, no cuDNN
    auto-tuning. Returns the function that puts the previous settings back."""
    threads, algorithms = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    benchmark = torch.backends.cudnn.benchmark
    os.environ.setdefault("MKL_CBWR", "COMPATIBLE,STRICT")
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = False

    def restore() -> None:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(algorithms)
        torch.backends.cudnn.benchmark = benchmark

    return restore


class Engine:
    """One training run of ``task_factory(engine)``'s task under ``config`` (a :class:`TrainConfig` or an
    :class:`~dualtoken.mllm.config.MLLMTrainConfig`: both have the engine's settings under the same names).

    The task is built after the runtime is set up and ``torch`` is seeded with ``config.seed``, so every rank (and
    every resume) builds the same initial weights."""

    def __init__(self, config: Any, task_factory) -> None:
        self.config = config
        self._restore = deterministic_settings() if config.deterministic else lambda: None
        try:
            self._build(task_factory)
        except BaseException:
            self._restore()  # the settings come back, as on close()
            raise

    def _build(self, task_factory) -> None:
        config = self.config
        self.runtime: Runtime = setup_runtime(config.device)
        self.out_dir = Path(config.output_dir)
        self.checkpoint_dir = self.out_dir / "checkpoints"
        self.autocast_dtype = autocast_dtype(config.precision, self.runtime.device)
        self.step = 0
        self.resumed_from: Path | None = None
        torch.manual_seed(config.seed)
        self.task: Task = task_factory(self)
        self.model = self.task.wrap(self.runtime, config.parallel)
        self.optimizer = build_optimizer(self.model, config.optimizer, self.task.parameter_groups())
        self.scheduler = build_scheduler(self.optimizer, config.max_steps, config.optimizer)
        fp16 = self.autocast_dtype == torch.float16  # bf16 and float32 need no loss scaling
        self.scaler = torch.amp.GradScaler(self.runtime.device.type, enabled=fp16)
        if config.checkpoint.resume:
            self._resume()
        if self.resumed_from is None:
            seed_everything(config.seed + self.runtime.rank)  # for what follows model construction
        self.logger: MetricsLogger | None = None  # made by fit()
        for callback in self.task.callbacks:
            callback.on_ready(self)

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.runtime.device.type, dtype=self.autocast_dtype)

    @property
    def samples_per_step(self) -> int:
        return self.task.samples_per_batch * self.config.grad_accum * self.runtime.world_size

    # ------------------------------------------------------------------------------------------------------------
    # checkpoints
    # ------------------------------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """The resume state (full tensors; every rank's RNG and data position), built collectively on all ranks."""
        parallel, runtime = self.config.parallel, self.runtime
        data_state = self.task.data.state_dict() if hasattr(self.task.data, "state_dict") else {}
        per_rank = gather_objects({"rng": checkpoints.rng_state(), "data": data_state})
        return {
            "format": CHECKPOINT_FORMAT,
            "task": self.task.name,
            "step": self.step,
            "config": to_dict(self.config),
            "model": full_model_state(self.model, parallel, runtime),
            "optimizer": full_optimizer_state(self.model, self.optimizer, parallel, runtime),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "ranks": per_rank,
            "callbacks": [callback.state_dict() for callback in self.task.callbacks],
        }

    def save_checkpoint(self) -> Path | None:
        state, path, keep = self.state_dict(), None, self.config.checkpoint.keep_last
        if self.runtime.is_main:
            path = checkpoints.save_checkpoint(self.checkpoint_dir, self.step, state, keep)
        self.runtime.barrier()
        for callback in self.task.callbacks:
            callback.on_checkpoint(self, path)
        return path

    def _resume(self) -> None:
        """Rank 0 finds the newest readable checkpoint and tells every rank, which then all read that one."""
        found = None
        if self.runtime.is_main:
            latest = checkpoints.load_latest_checkpoint(self.checkpoint_dir)
            found = str(latest[0]) if latest else None
        found = broadcast_object(found)
        if found is None:
            return
        state = checkpoints.read_checkpoint(found)
        if state.get("format") != CHECKPOINT_FORMAT or state.get("task") != self.task.name:
            raise CheckpointError(
                f"{found} predates this trainer's checkpoint format (or is another task's): resume from it is not "
                "possible; start a new output_dir, with init_from an exported model to keep its weights"
            )
        parallel, runtime = self.config.parallel, self.runtime
        try:
            load_model_state(self.model, state["model"], parallel, runtime)
        except RuntimeError as exc:
            raise CheckpointError(f"{found} does not fit this model: {str(exc).splitlines()[0]}") from None
        load_optimizer_state(self.model, self.optimizer, state["optimizer"], parallel, runtime)
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        for callback, extra in zip(self.task.callbacks, state["callbacks"]):
            callback.load_state_dict(extra)
        self.step = int(state["step"])
        ranks = state["ranks"]
        same_world = len(ranks) == runtime.world_size
        if not same_world:
            tqdm.write(
                f"{found} was saved by {len(ranks)} process(es), now {runtime.world_size}: random streams are "
                "reseeded and the data position is rank 0's"
            )
            seed_everything(self.config.seed + runtime.rank + self.step)
        else:
            checkpoints.set_rng_state(ranks[runtime.rank]["rng"])
        if hasattr(self.task.data, "load_state_dict"):
            self.task.data.load_state_dict(ranks[runtime.rank if same_world else 0]["data"])
        self.resumed_from = Path(found)
        if runtime.is_main:
            tqdm.write(f"resuming from {found} at step {self.step}")

    def export(self, path: str | Path) -> Path | None:
        """The task's model folder (rank 0 writes; under FSDP the full weights are gathered into a fresh model)."""
        state = full_model_state(self.model, self.config.parallel, self.runtime)
        written = None
        if self.runtime.is_main:
            model = unwrap(self.model)
            if self.runtime.distributed and self.config.parallel == "fsdp":
                model = self.task.fresh_model()
                model.load_state_dict(state)
            written = self.task.export(Path(path), model)
        self.runtime.barrier()
        return written

    # ------------------------------------------------------------------------------------------------------------
    # the loop
    # ------------------------------------------------------------------------------------------------------------

    def train_step(self) -> dict[str, float]:
        """One optimiser step of ``grad_accum`` micro-steps -> the step's mean scalars (``loss``, ``lr``, ...)."""
        task, accum = self.task, self.config.grad_accum
        task.train_mode()
        for callback in self.task.callbacks:
            callback.on_step_begin(self)
        sums: dict[str, float] = defaultdict(float)
        for micro in range(accum):
            batch = next(task.data)
            with gradient_sync(self.model, micro == accum - 1):
                with self.autocast():
                    loss, scalars = task.loss(self.model, batch)
                self.scaler.scale(loss / accum).backward()
            sums["loss"] += float(loss.detach()) / accum
            for name, value in scalars.items():
                sums[name] += value / accum
        sums["lr"], sums["grad_norm"] = optimizer_step(
            self.optimizer, self.scheduler, self.scaler, self.config.optimizer.grad_clip
        )
        for callback in self.task.callbacks:
            sums.update(callback.after_optimizer_step(self))
        return dict(sums)

    def fit(self, stop_at: int | None = None) -> dict[str, Any]:
        """Train until ``max_steps`` (or ``stop_at``, as if interrupted there; or ``max_seconds`` of training, which
        ends the run as ``max_steps`` does); checkpoint at the end, and export to ``<output_dir>/final`` when the
        run is finished. Returns ``step``, ``out_of_time``, ``metrics`` (the last record), ``export``,
        ``checkpoint`` and ``resumed_from``."""
        cfg, runtime = self.config, self.runtime
        end = cfg.max_steps if stop_at is None else min(cfg.max_steps, stop_at)
        self.logger = MetricsLogger(self.out_dir, cfg.log, enabled=runtime.is_main, resume_step=self.step)
        if runtime.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            (self.out_dir / "train_config.json").write_text(json.dumps(to_dict(cfg), indent=2) + "\n")
        for callback in self.task.callbacks:
            callback.on_start(self)
        bar = self._progress_bar()
        last: dict[str, float] = {}
        window: dict[str, list[float]] = defaultdict(list)
        window_steps, clock = 0, time.perf_counter()
        started, out_of_time, checkpoint = time.perf_counter(), False, None
        while self.step < end:
            values = self.train_step()
            self.step += 1
            window_steps += 1
            if cfg.max_seconds and self._out_of_time(started):
                end, out_of_time = self.step, True
            for name, value in values.items():
                window[name].append(value)
            if cfg.max_seconds:  # the bar counts seconds: its ETA is the time left
                bar.update(min(time.perf_counter() - started, cfg.max_seconds) - bar.n)
                bar.set_postfix(step=self.step, loss=f"{values['loss']:.4f}")
            else:
                bar.update(1)
                bar.set_postfix(loss=f"{values['loss']:.4f}")
            if self.step % cfg.log.every == 0 or self.step == end:
                last = self._record(window, window_steps, time.perf_counter() - clock)
                window, window_steps, clock = defaultdict(list), 0, time.perf_counter()
            for callback in self.task.callbacks:
                callback.on_step_end(self, self.step == end)
            if self.step % cfg.checkpoint.every == 0 or self.step == end:
                checkpoint = self.save_checkpoint()
            if cfg.checkpoint.export_every and self.step % cfg.checkpoint.export_every == 0:
                self.export(self.out_dir / f"export-{self.step:08d}")
        bar.close()
        finished = self.step >= cfg.max_steps or out_of_time
        for callback in self.task.callbacks:
            callback.on_end(self, finished)
        exported = self.export(self.out_dir / "final") if finished else None
        self.logger.close()
        if checkpoint is None and runtime.is_main:
            checkpoint = checkpoints.checkpoint_path(self.checkpoint_dir, self.step)
        return {
            "step": self.step,
            "out_of_time": out_of_time,
            "metrics": last,
            "export": str(exported) if exported else None,
            "checkpoint": str(checkpoint) if checkpoint else None,
            "resumed_from": str(self.resumed_from) if self.resumed_from else None,
        }

    def _progress_bar(self) -> tqdm:
        """Steps towards ``max_steps``; under a wall-clock budget (``max_seconds``), its seconds (whichever comes
        first ends the run), so that the bar's remaining time is the budget's."""
        cfg = self.config
        enabled = cfg.log.progress and self.runtime.is_main
        desc = f"train {self.task.name}"
        if not cfg.max_seconds:
            return tqdm(total=cfg.max_steps, initial=self.step, desc=desc, unit="step", disable=not enabled)
        bar_format = "{desc}: {percentage:3.0f}%|{bar}| {elapsed}<{remaining} left{postfix}"
        return tqdm(total=cfg.max_seconds, desc=desc, bar_format=bar_format, disable=not enabled)

    def _record(self, window: dict[str, list[float]], steps: int, seconds: float) -> dict[str, float]:
        """The ``train`` record of a window of steps: mean scalars over steps and processes, and the throughput."""
        values = self.reduce({name: sum(v) / len(v) for name, v in window.items()})
        values["samples_per_s"] = self.samples_per_step * steps / max(seconds, 1e-9)
        values["peak_memory_mb"] = peak_memory_mb(self.runtime.device)
        data = self.task.data
        if hasattr(data, "epoch"):
            values["epoch"] = data.epoch
        if hasattr(data, "skipped"):
            values["skipped_images"] = self.reduce({"n": float(data.skipped)}, mean=False)["n"]
        self.logger.log(self.step, values)
        return values

    def log_eval(self, values: dict[str, float]) -> None:
        """An ``eval`` record, with ``samples_seen`` (the learning curve's x); nothing when ``values`` is empty."""
        if values:
            self.logger.log(self.step, {**values, "samples_seen": self.step * self.samples_per_step}, "eval")

    def _out_of_time(self, started: float) -> bool:
        """Whether ``max_seconds`` of training have passed (rank 0's clock decides for every rank)."""
        over = time.perf_counter() - started >= self.config.max_seconds
        return bool(broadcast_object(over))

    def reduce(self, values: dict[str, float], mean: bool = True) -> dict[str, float]:
        """Average (or sum) scalars over processes."""
        if not self.runtime.distributed:
            return dict(values)
        names = sorted(values)
        tensor = torch.tensor([values[n] for n in names], dtype=torch.float64, device=self.runtime.device)
        torch.distributed.all_reduce(tensor)
        if mean:
            tensor /= self.runtime.world_size
        return dict(zip(names, tensor.tolist()))

    def close(self) -> None:
        self.runtime.close()
        self._restore()

    def run(self, stop_at: int | None = None) -> dict[str, Any]:
        """:meth:`fit`, then release the process group this engine made."""
        try:
            return self.fit(stop_at=stop_at)
        finally:
            self.close()
