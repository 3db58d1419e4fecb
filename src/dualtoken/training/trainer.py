"""The trainer: one code path for one process and for torchrun (DDP or FSDP2) across processes and nodes.

One optimiser step = ``grad_accum`` micro-steps, each: forward (codebooks update by EMA inside), the frozen
teacher's targets, the objective, backward; then the generator update, and, once the GAN is on, one
discriminator update on the same micro-batches. Mixed precision is bf16 autocast on CUDA by default (the
quantizers always compute in float32). Everything needed to continue exactly is checkpointed; the tokenizer is
exported with ``save_pretrained`` (never with its teacher).
"""

from __future__ import annotations

import contextlib
import copy
import random
import time
import warnings
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from ..config import to_dict
from ..data import SkippedImageWarning, TrainLoader, open_image_source, resolve_source
from ..discriminator import PatchDiscriminator
from ..errors import CheckpointError, ConfigError
from ..factory import build_tokenizer
from ..io import save_image
from ..losses import DualTokenObjective, teacher_targets
from ..metrics import psnr
from ..perceptual import build_perceptual
from ..tokenizer import DualTokenizer
from . import checkpoints
from .config import TrainConfig
from .distributed import (
    Runtime,
    broadcast_object,
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
from .freeze import apply_freeze, freeze_outside_pixel_branch, set_train_mode, tail_lr_scales
from .metrics import MetricsLogger
from .monitor import CodebookUsage, peak_memory_mb, reconstruction_grid
from .optim import build_optimizer, build_scheduler, optimizer_step

CHECKPOINT_FORMAT = 1


class Trainer:
    """Train a DualTokenizer as ``config`` says.

    ``tokenizer`` and ``teacher`` may be given (tests, notebooks); otherwise they come from the config. A given
    teacher is used as it is, frozen; it is never part of the trained model nor of any checkpoint. ``loader``
    replaces the file loader of ``data.train``: an iterator of ``{"images": (B, 3, H, W)}`` batches with the
    :class:`~dualtoken.data.TrainLoader` attributes ``epoch``, ``skipped``, ``state_dict`` and ``load_state_dict``
    (e.g. :class:`~dualtoken.data.DeviceCropLoader`, images held and cropped on the accelerator).

    ``branch: "pixel"`` trains the pixel projections, quantizer and decoder alone: the forward stops at the pixel
    tap (``pixel_only``), everything else is frozen, and the loss is the same objective without its semantic
    terms (pixel commitment, MSE, L1, perceptual, GAN).
    """

    def __init__(
        self,
        config: TrainConfig,
        tokenizer: DualTokenizer | None = None,
        teacher: torch.nn.Module | None = None,
        loader: Iterator[dict[str, Any]] | None = None,
    ) -> None:
        self.config = config
        self.runtime: Runtime = setup_runtime(config.device)
        self.out_dir = Path(config.output_dir)
        self.checkpoint_dir = self.out_dir / "checkpoints"
        device = self.runtime.device
        self.autocast_dtype = resolve_precision(config.precision, device)

        torch.manual_seed(config.seed)  # the same initial weights on every rank
        tok = tokenizer if tokenizer is not None else build_tokenizer(config)
        self.teacher = self._make_teacher(tok, teacher)
        self.frozen = apply_freeze(tok, config.freeze)
        self.pixel_only = config.branch == "pixel"
        if config.data.eval_image_size and self.runtime.distributed and config.parallel == "fsdp":
            raise ConfigError("data.eval_image_size needs the whole model in one process: use parallel=ddp")
        if self.pixel_only:
            self.frozen = freeze_outside_pixel_branch(tok)
        tok.backbone.set_gradient_checkpointing(config.gradient_checkpointing)
        tok.to(device)
        self.tokenizer = tok
        if config.loss.gan.enabled and not tok.decoder.conv_out.weight.requires_grad:
            raise ConfigError("loss.gan needs a trainable decoder, but the freeze preset freezes it")
        self.model = wrap_model(tok, self.runtime, config.parallel, self._find_unused())
        self.optimizer = build_optimizer(tok, config.optimizer, tail_lr_scales(tok, config.freeze))
        self.scheduler = build_scheduler(self.optimizer, config.max_steps, config.optimizer)

        perceptual = None
        if config.loss.perceptual:
            loss = config.loss
            perceptual = build_perceptual(
                loss.perceptual_kind, loss.vgg_weights, loss.lpips_heads, loss.perceptual_resize
            )
            perceptual = perceptual.to(device)
        self.objective = DualTokenObjective(config.loss, perceptual)

        self.discriminator = self.disc_model = self.disc_optimizer = self.disc_scheduler = None
        if config.loss.gan.enabled:
            self.discriminator = PatchDiscriminator(config.loss.gan.discriminator).to(device)
            self.disc_model = self.discriminator
            if self.runtime.distributed:
                from torch.nn.parallel import DistributedDataParallel

                ids = [device] if device.type == "cuda" else None
                self.disc_model = DistributedDataParallel(self.discriminator, device_ids=ids)
            self.disc_optimizer = build_optimizer(self.discriminator, config.disc_optimizer)
            gan_steps = max(1, config.max_steps - config.loss.gan.start_step)
            self.disc_scheduler = build_scheduler(self.disc_optimizer, gan_steps, config.disc_optimizer)
        fp16 = self.autocast_dtype == torch.float16  # bf16 and float32 need no loss scaling
        self.scaler = torch.amp.GradScaler(device.type, enabled=fp16)
        self.disc_scaler = torch.amp.GradScaler(device.type, enabled=fp16)

        self.loader = loader if loader is not None else TrainLoader(
            resolve_source(config.data.train, config.data.shuffle_buffer),
            tok.image_size,
            config.data.batch_size,
            seed=config.seed,
            rank=self.runtime.rank,
            world_size=self.runtime.world_size,
            num_workers=config.data.num_workers,
            crop_scale=config.data.crop_scale,
            pin_memory=device.type == "cuda",
        )
        self.step = 0
        self.resumed_from: Path | None = None
        if config.checkpoint.resume:
            self._resume()
        self.codebook_init: list[dict[str, float]] = []
        if self.resumed_from is None:
            self._reseed(config.seed + self.runtime.rank)
            if config.codebook_init.method == "kmeans":
                self.codebook_init = self._init_pixel_codebook()
        self.heldout = self._heldout_images()
        self._eval_model: DualTokenizer | None = None  # the model at data.eval_image_size, built at first use

    # ------------------------------------------------------------------------------------------------------------
    # set-up helpers
    # ------------------------------------------------------------------------------------------------------------

    def _make_teacher(self, tok: DualTokenizer, teacher: torch.nn.Module | None) -> torch.nn.Module | None:
        """The given teacher, the pretrained tower, or a copy of the initial tower; frozen, in eval mode."""
        cfg = self.config
        if teacher is None and cfg.teacher == "none":
            return None
        if teacher is None:
            teacher = tok.teacher() if cfg.teacher == "pretrained" else copy.deepcopy(tok.backbone)
        teacher.requires_grad_(False)
        return teacher.eval().to(self.runtime.device)

    def _find_unused(self) -> bool:
        """DDP must look for unused parameters when a trainable path has no loss term."""
        if self.config.find_unused_parameters is not None:
            return self.config.find_unused_parameters
        if self.config.branch == "pixel":
            return False  # only pixel-path parameters train, and the reconstruction reaches all of them
        loss = self.config.loss
        pooled_used = loss.needs_teacher and bool(loss.pooled_mse or loss.pooled_cosine)
        pixels_used = bool(loss.pixel_mse or loss.pixel_l1 or loss.perceptual)
        return not (pooled_used and pixels_used)

    @staticmethod
    def _reseed(seed: int) -> None:
        """Seed Python, NumPy and torch (all devices) for what follows model construction."""
        random.seed(seed)
        np.random.seed(seed % 2**32)
        torch.manual_seed(seed)

    @torch.no_grad()
    def _init_pixel_codebook(self) -> list[dict[str, float]]:
        """k-means of the pixel tap's latents over ``codebook_init.batches`` training batches fills the pixel
        codebook (see ResidualQuantizer.init_from_data; with several processes, rank 0's codebook is kept)."""
        cfg, tok = self.config.codebook_init, self.tokenizer
        latents = []
        for _ in range(cfg.batches):
            images = next(self.loader)["images"].to(self.runtime.device)
            latents.append(tok.pixel_latents(images).flatten(0, 1))
        vectors = torch.cat(latents)
        quantizer = tok.quantizer("pixel")
        generator = torch.Generator().manual_seed(self.config.seed)
        per_update = vectors.shape[0] // cfg.batches
        if cfg.shares and len(cfg.shares) != quantizer.depth:
            raise ConfigError(f"codebook_init.shares has {len(cfg.shares)} entries for {quantizer.depth} depths")
        return quantizer.init_from_data(vectors, per_update, cfg.iterations, generator, cfg.shares or None)

    def _heldout_images(self) -> torch.Tensor | None:
        """A fixed batch of held-out images (data.eval) for PSNR and grids; identical on every rank."""
        cfg = self.config
        if not cfg.data.eval:
            return None
        count = max(cfg.data.eval_images, cfg.log.grid_images)
        images = []
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", SkippedImageWarning)  # held-out images: a skipped one is not news
            size = self.tokenizer.image_size if cfg.data.eval_image_size is None else (cfg.data.eval_image_size,) * 2
            for image, _ in open_image_source(cfg.data.eval, size):
                images.append(image)
                if len(images) == count:
                    break
        return torch.stack(images) if images else None

    def _autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.runtime.device.type, dtype=self.autocast_dtype)

    # ------------------------------------------------------------------------------------------------------------
    # checkpoints
    # ------------------------------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """The resume state (full tensors; per-rank RNG and data positions), built collectively on all ranks."""
        parallel, runtime = self.config.parallel, self.runtime
        per_rank = gather_objects({"rng": checkpoints.rng_state(), "data": self.loader.state_dict()}, runtime)
        state = {
            "format": CHECKPOINT_FORMAT,
            "step": self.step,
            "config": to_dict(self.config),
            "model": full_model_state(self.model, parallel, runtime),
            "optimizer": full_optimizer_state(self.model, self.optimizer, parallel, runtime),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "disc_scaler": self.disc_scaler.state_dict(),
            "ranks": per_rank,
        }
        if self.discriminator is not None:
            state["discriminator"] = self.discriminator.state_dict()
            state["disc_optimizer"] = self.disc_optimizer.state_dict()
            state["disc_scheduler"] = self.disc_scheduler.state_dict()
        return state

    def save_checkpoint(self) -> Path | None:
        state = self.state_dict()
        path = None
        if self.runtime.is_main:
            path = checkpoints.save_checkpoint(
                self.checkpoint_dir, self.step, state, self.config.checkpoint.keep_last
            )
        self.runtime.barrier()
        return path

    def _resume(self) -> None:
        found = None
        if self.runtime.is_main:
            latest = checkpoints.load_latest_checkpoint(self.checkpoint_dir)
            found = str(latest[0]) if latest else None
        found = broadcast_object(found, self.runtime)
        if found is None:
            return
        state = checkpoints.read_checkpoint(found)
        parallel, runtime = self.config.parallel, self.runtime
        try:
            load_model_state(self.model, state["model"], parallel, runtime)
        except RuntimeError as exc:
            raise CheckpointError(f"{found} does not fit this model: {str(exc).splitlines()[0]}") from None
        load_optimizer_state(self.model, self.optimizer, state["optimizer"], parallel, runtime)
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.disc_scaler.load_state_dict(state["disc_scaler"])
        if self.discriminator is not None and "discriminator" in state:
            self.discriminator.load_state_dict(state["discriminator"])
            self.disc_optimizer.load_state_dict(state["disc_optimizer"])
            self.disc_scheduler.load_state_dict(state["disc_scheduler"])
        self.step = int(state["step"])
        ranks = state["ranks"]
        if len(ranks) == runtime.world_size:
            checkpoints.set_rng_state(ranks[runtime.rank]["rng"])
            self.loader.load_state_dict(ranks[runtime.rank]["data"])
        else:
            warnings.warn(
                f"{found} was saved by {len(ranks)} process(es), now {runtime.world_size}: "
                "random streams are reseeded and the data epoch restarts",
                RuntimeWarning,
                stacklevel=2,
            )
            self._reseed(self.config.seed + runtime.rank + self.step)
            self.loader.load_state_dict(ranks[0]["data"])
        self.resumed_from = Path(found)

    def export(self, path: str | Path) -> Path | None:
        """The tokenizer as ``config.json`` + ``model.safetensors`` (rank 0 writes; no teacher, no optimiser)."""
        state = full_model_state(self.model, self.config.parallel, self.runtime)
        written = None
        if self.runtime.is_main:
            if self.runtime.distributed and self.config.parallel == "fsdp":
                gathered = DualTokenizer.from_config(self.tokenizer.config)
                gathered.load_state_dict(state)
                written = gathered.save_pretrained(path)
            else:
                written = unwrap(self.model).save_pretrained(path)
        self.runtime.barrier()
        return written

    # ------------------------------------------------------------------------------------------------------------
    # the steps
    # ------------------------------------------------------------------------------------------------------------

    def _train_step(self, usage: CodebookUsage) -> dict[str, float]:
        cfg, device = self.config, self.runtime.device
        gan_on = self.discriminator is not None and cfg.loss.gan.active(self.step)
        if gan_on:
            self._maybe_restart_discriminator()
        tok = unwrap(self.model)
        set_train_mode(tok, cfg.freeze)
        sums: dict[str, float] = defaultdict(float)
        micro_batches = []
        for micro in range(cfg.grad_accum):
            batch = next(self.loader)
            images = batch["images"].to(device, non_blocking=True)
            last = micro == cfg.grad_accum - 1
            with gradient_sync(self.model, last):
                with self._autocast():
                    out = self.model(images, pixel_only=self.pixel_only)
                    targets = (
                        teacher_targets(self.teacher, images, tok.config.semantic_layer)
                        if (self.teacher is not None and cfg.loss.needs_teacher)
                        else None
                    )
                    discriminator = None
                    if gan_on:
                        self.discriminator.requires_grad_(False)
                        discriminator = self.discriminator
                    total, terms = self.objective.generator(
                        out,
                        images,
                        targets,
                        discriminator=discriminator,
                        last_layer=tok.decoder.conv_out.weight,
                    )
                self.scaler.scale(total / cfg.grad_accum).backward()
            if gan_on:
                self.discriminator.requires_grad_(True)
                micro_batches.append((images, out.reconstruction.detach()))
            usage.update("pixel", out.pixel_codes)
            if out.semantic_codes is not None:
                usage.update("semantic", out.semantic_codes)
            for name, value in terms.items():
                sums[name] += float(value) / cfg.grad_accum
        sums["lr"], sums["grad_norm"] = optimizer_step(
            self.optimizer, self.scheduler, self.scaler, cfg.optimizer.grad_clip
        )
        if gan_on:
            for name, value in self._discriminator_step(micro_batches).items():
                sums[name] += value
        return dict(sums)

    def _discriminator_step(self, micro_batches: list[tuple[torch.Tensor, torch.Tensor]]) -> dict[str, float]:
        """One discriminator update on the step's (images, detached reconstructions) micro-batches."""
        sums: dict[str, float] = defaultdict(float)
        count = len(micro_batches)
        for index, (images, reconstruction) in enumerate(micro_batches):
            with gradient_sync(self.disc_model, index == count - 1):
                with self._autocast():
                    logits = self.disc_model(torch.cat([images, reconstruction]))
                    real, fake = logits.split(images.shape[0])
                    total, terms = self.objective.discriminator(real, fake, self.step)
                self.disc_scaler.scale(total / count).backward()
            for name, value in terms.items():
                sums[name] += float(value) / count
        clip = self.config.disc_optimizer.grad_clip
        sums["disc_lr"], sums["disc_grad_norm"] = optimizer_step(
            self.disc_optimizer, self.disc_scheduler, self.disc_scaler, clip
        )
        return sums

    def _maybe_restart_discriminator(self) -> None:
        gan = self.config.loss.gan
        since = self.step - gan.start_step
        if not gan.restart_every or since == 0 or since % gan.restart_every:
            return
        devices = [self.runtime.device] if self.runtime.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(self.config.seed + self.step)  # the same fresh weights on every rank
            self.discriminator.reset_parameters()
        self.disc_optimizer.state.clear()

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """PSNR and pixel MSE of the held-out images, reconstructed in eval mode (no codebook update)."""
        if self.heldout is None:
            return {}
        tok = unwrap(self.model)
        tok.eval()
        images = self.heldout[: self.config.data.eval_images].to(self.runtime.device)
        with self._autocast():
            out = self._at_eval_size(tok)(images, pixel_only=self.pixel_only)  # every rank runs it (FSDP gathers)
        set_train_mode(tok, self.config.freeze)
        reconstruction = out.reconstruction.float()
        return {
            "psnr": float(psnr(reconstruction, images).mean()),
            "pixel_mse": float(torch.mean((reconstruction - images) ** 2)),
        }

    def _at_eval_size(self, tok: DualTokenizer) -> DualTokenizer:
        """``tok``, or its current weights at ``data.eval_image_size`` when that differs from the training
        resolution (that model is built once, on this process's device, and refreshed at each call)."""
        size = self.config.data.eval_image_size
        if size is None or tok.image_size == (size, size):
            return tok
        if self._eval_model is None:
            self._eval_model = tok.at_resolution(size).to(self.runtime.device)
        else:
            self._eval_model.load_state_dict(tok.state_dict())
        return self._eval_model.eval()

    def _write_grid(self) -> None:
        if self.heldout is None:
            return
        tok = unwrap(self.model)
        tok.eval()
        images = self.heldout[: self.config.log.grid_images].to(self.runtime.device)
        with torch.no_grad(), self._autocast():
            out = self._at_eval_size(tok)(images, pixel_only=self.pixel_only)
        set_train_mode(tok, self.config.freeze)
        if self.runtime.is_main:
            grid = reconstruction_grid(images.cpu(), out.reconstruction.float().cpu())
            save_image(grid, self.out_dir / "grids" / f"step-{self.step:08d}.png")
            self.logger.image(self.step, "reconstructions", grid)

    # ------------------------------------------------------------------------------------------------------------
    # the loop
    # ------------------------------------------------------------------------------------------------------------

    def fit(self, stop_at: int | None = None) -> dict[str, Any]:
        """Train until ``max_steps`` (or ``stop_at``, as if interrupted there; or ``max_seconds`` of training,
        which ends the run as ``max_steps`` does); checkpoint and export at the end."""
        cfg, runtime = self.config, self.runtime
        end = min(cfg.max_steps, stop_at) if stop_at is not None else cfg.max_steps
        self.logger = MetricsLogger(self.out_dir, cfg.log, enabled=runtime.is_main, resume_step=self.step)
        if runtime.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            (self.out_dir / "train_config.json").write_text(cfg.to_json() + "\n")
        if self.codebook_init:
            report = {f"pixel/depth{q}/{k}": v for q, values in enumerate(self.codebook_init) for k, v in values.items()}
            self.logger.log(self.step, report, kind="codebook_init")
        tok = unwrap(self.model)
        depths = {"pixel": tok.pixel_depth} if self.pixel_only else {"pixel": tok.pixel_depth, "semantic": tok.semantic_depth}
        usage = CodebookUsage({b: tok.codebook_size(b) for b in depths}, depths, runtime.device)
        images_per_step = cfg.data.batch_size * cfg.grad_accum * runtime.world_size
        bar = tqdm(
            total=cfg.max_steps,
            initial=self.step,
            desc="train",
            unit="step",
            disable=not (cfg.log.progress and runtime.is_main),
        )
        if self.step == 0 and self.heldout is not None:
            self.logger.log(0, self._evaluate_seen(images_per_step), kind="eval")  # the start of the held-out curve
        last: dict[str, float] = {}
        window: dict[str, list[float]] = defaultdict(list)
        window_steps, clock = 0, time.perf_counter()
        started, out_of_time = time.perf_counter(), False
        while self.step < end:
            values = self._train_step(usage)
            self.step += 1
            window_steps += 1
            if cfg.max_seconds and self._out_of_time(started):
                end, out_of_time = self.step, True
            for name, value in values.items():
                window[name].append(value)
            bar.update(1)
            bar.set_postfix(loss=f"{values['total']:.4f}")
            if self.step % cfg.log.every == 0 or self.step == end:
                elapsed = time.perf_counter() - clock
                last = self._reduce({k: sum(v) / len(v) for k, v in window.items()})
                last["images_per_s"] = images_per_step * window_steps / max(elapsed, 1e-9)
                last["peak_memory_mb"] = peak_memory_mb(runtime.device)
                last["epoch"] = self.loader.epoch
                last["skipped_images"] = self._reduce({"n": float(self.loader.skipped)}, mean=False)["n"]
                self.logger.log(self.step, last)
                window, window_steps, clock = defaultdict(list), 0, time.perf_counter()
            if self.step % cfg.log.codebook_every == 0 or self.step == end:
                self.logger.log(self.step, usage.summary(), kind="codebook")
            if (cfg.log.eval_every and self.step % cfg.log.eval_every == 0) or self.step == end:
                heldout = self._evaluate_seen(images_per_step)
                if heldout:
                    self.logger.log(self.step, heldout, kind="eval")
            if (cfg.log.grid_every and self.step % cfg.log.grid_every == 0) or self.step == end:
                self._write_grid()
            if self.step % cfg.checkpoint.every == 0 or self.step == end:
                self.save_checkpoint()
            if cfg.checkpoint.export_every and self.step % cfg.checkpoint.export_every == 0:
                self.export(self.out_dir / f"export-{self.step:08d}")
        bar.close()
        finished = self.step >= cfg.max_steps or out_of_time
        exported = self.export(self.out_dir / "final") if finished else None
        self.logger.close()
        return {
            "step": self.step,
            "out_of_time": out_of_time,
            "metrics": last,
            "export": str(exported) if exported else None,
            "checkpoint": str(checkpoints.checkpoint_path(self.checkpoint_dir, self.step)),
            "resumed_from": str(self.resumed_from) if self.resumed_from else None,
            "frozen_parameters": len(self.frozen),
        }

    def _evaluate_seen(self, images_per_step: int) -> dict[str, float]:
        """The held-out evaluation with the number of training images seen so far (the learning curve's x)."""
        values = self.evaluate()
        return {**values, "images_seen": self.step * images_per_step} if values else values

    def _out_of_time(self, started: float) -> bool:
        """Whether ``max_seconds`` of training have passed (rank 0's clock decides for every rank)."""
        over = time.perf_counter() - started >= self.config.max_seconds
        return bool(broadcast_object(over, self.runtime))

    def _reduce(self, values: dict[str, float], mean: bool = True) -> dict[str, float]:
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


def train(config: TrainConfig, stop_at: int | None = None) -> dict[str, Any]:
    """Build a :class:`Trainer` from ``config``, run it, release the process group it made; ``branch: "semantic"``
    trains the semantic branch alone on cached tap features instead (one process)."""
    if config.branch == "semantic":
        from .semantic import train_semantic_branch

        return train_semantic_branch(config, stop_at=stop_at)
    trainer = Trainer(config)
    try:
        return trainer.fit(stop_at=stop_at)
    finally:
        trainer.close()
