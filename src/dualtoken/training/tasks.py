"""The tokenizer as an engine task: the whole model (with its GAN step), or its pixel branch alone.

One micro-step: forward (codebooks update by EMA inside), the frozen teacher's targets, the objective; once the GAN
is on, the discriminator updates after the generator on the step's micro-batches. The tokenizer is exported with
``save_pretrained`` (never with its teacher).

``branch: "pixel"`` trains the pixel projections, quantizer and decoder alone: the forward stops at the pixel tap
(``pixel_only``), everything else is frozen, and the loss is the same objective without its semantic terms.
"""

from __future__ import annotations

import copy
import warnings
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..data import SkippedImageWarning, TrainLoader, open_image_source, resolve_source
from ..discriminator import PatchDiscriminator
from ..errors import ConfigError
from ..evaluation.protocol import to_uint8_levels
from ..factory import build_tokenizer
from ..io import save_image
from ..losses import DualTokenObjective, LossConfig, teacher_targets
from ..metrics import psnr
from ..perceptual import build_perceptual
from ..tokenizer import DualTokenizer
from .config import TrainConfig
from .distributed import Runtime, gradient_sync, unwrap, wrap_model
from .engine import Callback, Engine, ShuffledBatches, Task
from .freeze import apply_freeze, freeze_outside_pixel_branch, set_train_mode, tail_lr_scales
from .monitor import CodebookMonitor, reconstruction_grid
from .optim import build_optimizer, build_scheduler, optimizer_step
from .tap_cache import build_tap_cache, check_frozen_below_taps


def make_teacher(tokenizer: DualTokenizer, setting: str, device: torch.device, given: nn.Module | None = None):
    """The given teacher, the pretrained tower, or a copy of the initial tower (``setting``); frozen, in eval mode.
    None for ``teacher: none`` without a given one."""
    if given is None and setting == "none":
        return None
    if given is None:
        given = tokenizer.teacher() if setting == "pretrained" else copy.deepcopy(tokenizer.backbone)
    given.requires_grad_(False)
    return given.eval().to(device)


def make_objective(loss: LossConfig, device: torch.device) -> DualTokenObjective:
    """The generator objective of ``loss``, with its perceptual network on ``device`` when the term is on."""
    perceptual = None
    if loss.perceptual:
        perceptual = build_perceptual(loss.perceptual_kind, loss.vgg_weights, loss.lpips_heads, loss.perceptual_resize)
        perceptual = perceptual.to(device)
    return DualTokenObjective(loss, perceptual)


class TokenizerModelTask(Task):
    """What the tasks that train a DualTokenizer share: its export, a pretrained tail's learning-rate scale."""

    tokenizer: DualTokenizer
    config: TrainConfig

    def parameter_groups(self) -> list[tuple[nn.Module, float]]:
        return tail_lr_scales(self.tokenizer, self.config.freeze)

    def export(self, path: Path, model: nn.Module) -> Path:
        return model.save_pretrained(path)

    def fresh_model(self) -> nn.Module:
        return DualTokenizer.from_config(self.tokenizer.config)


class TokenizerTask(TokenizerModelTask):
    """The tokenizer (``branch: "both"``) or its pixel branch (``branch: "pixel"``) on images.

    ``tokenizer`` and ``teacher`` may be given (tests, notebooks); otherwise they come from the config. ``loader``
    replaces the file loader of ``data.train``: an iterator of ``{"images": (B, 3, H, W)}`` batches with the
    :class:`~dualtoken.data.TrainLoader` attributes ``epoch``, ``skipped``, ``state_dict`` and ``load_state_dict``
    (e.g. :class:`~dualtoken.data.DeviceCropLoader`, images held and cropped on the accelerator).
    """

    def __init__(
        self,
        engine: Engine,
        tokenizer: DualTokenizer | None = None,
        teacher: nn.Module | None = None,
        loader: Iterator[dict[str, Any]] | None = None,
    ) -> None:
        config: TrainConfig = engine.config
        if config.cache.folder is not None and not config.cache.taps:
            raise ConfigError('cache.folder applies to branch "semantic" and to cache.taps only (cached tap features)')
        if config.cache.taps and (loader is not None or engine.runtime.distributed):
            raise ConfigError("cache.taps reads its own cache in one process: no given loader, no torchrun")
        self.engine, self.config = engine, config
        self.name = "pixel" if config.branch == "pixel" else "tokenizer"  # checkpoints say which task wrote them
        runtime = engine.runtime
        device = runtime.device
        tok = tokenizer if tokenizer is not None else build_tokenizer(config)
        self.teacher = make_teacher(tok, config.teacher, device, teacher)
        self.pixel_only = config.branch == "pixel"
        self.frozen = freeze_outside_pixel_branch(tok) if self.pixel_only else apply_freeze(tok, config.freeze)
        if config.data.eval_image_size and runtime.distributed and config.parallel == "fsdp":
            raise ConfigError("data.eval_image_size needs the whole model in one process: use parallel=ddp")
        if config.loss.reencode and runtime.distributed and config.parallel == "fsdp":
            raise ConfigError("loss.reencode runs the tower outside the model's forward: use parallel=ddp")
        tok.backbone.set_gradient_checkpointing(config.gradient_checkpointing)
        self.model = self.tokenizer = tok.to(device)
        self.objective = make_objective(config.loss, device)
        data = config.data
        self.cache = None
        if config.cache.taps:
            check_frozen_below_taps(tok)
            folder = Path(config.cache.folder) if config.cache.folder else Path(config.output_dir) / "features"
            self.cache = build_tap_cache(config, tok, self.teacher, folder, config.log.progress)
            self.teacher = None  # its targets are cached
            layers, semantic_layer = tok.tap_layers(), tok.config.semantic_layer
            self.loader = ShuffledBatches(
                len(self.cache), data.batch_size, config.seed, runtime,
                lambda index, epoch: self.cache.batch(index, layers, semantic_layer, device),
            )
        self.data = self.loader = self.loader if self.cache is not None else loader or TrainLoader(
            resolve_source(data.train, data.shuffle_buffer), tok.image_size, data.batch_size, config.seed,
            runtime.rank, runtime.world_size, data.num_workers, data.crop_scale, pin_memory=device.type == "cuda",
        )
        self.samples_per_batch = config.data.batch_size
        depths = {"pixel": tok.pixel_depth} if self.pixel_only else {"pixel": tok.pixel_depth, "semantic": tok.semantic_depth}
        self.usage = CodebookMonitor({b: tok.codebook_size(b) for b in depths}, depths, device)
        self.gan = GanStep(engine, self.objective) if config.loss.gan.enabled else None
        if self.gan is not None and not tok.decoder.conv_out.weight.requires_grad:
            raise ConfigError("loss.gan needs a trainable decoder, but the freeze preset freezes it")
        self.kmeans = KMeansInit(self) if config.codebook_init.method == "kmeans" else None
        self.heldout = HeldOutImages(self) if config.data.eval else None
        self.callbacks = [c for c in (self.gan, self.kmeans, self.usage, self.heldout) if c is not None]

    def wrap(self, runtime: Runtime, parallel: str) -> nn.Module:
        return wrap_model(self.tokenizer, runtime, parallel, self._find_unused())

    def _find_unused(self) -> bool:
        """DDP must look for unused parameters when a trainable path has no loss term."""
        if self.config.find_unused_parameters is not None:
            return self.config.find_unused_parameters
        if self.pixel_only:
            return False  # only pixel-path parameters train, and the reconstruction reaches all of them
        loss = self.config.loss
        pooled_used = loss.needs_teacher and bool(loss.pooled_mse or loss.pooled_cosine)
        pixels_used = bool(loss.pixel_mse or loss.pixel_l1 or loss.perceptual)
        return not (pooled_used and pixels_used)

    def train_mode(self) -> None:
        set_train_mode(self.tokenizer, self.config.freeze)

    @torch.no_grad()
    def latents(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """The inputs (B, h*w, D) of the codebooks this run trains for a training batch: the pixel vocabulary's (a
        single vocabulary's one codebook), and the semantic one's where the model has two and both train."""
        tok = self.tokenizer
        if self.pixel_only:
            return {"pixel": tok.pixel_latents(batch["images"].to(self.engine.runtime.device))}
        if self.cache is not None:
            taps = tok.taps_from_tokens(batch["taps"])
        else:
            taps = tok.taps_from_tokens(tok.tap_tokens(batch["images"].to(self.engine.runtime.device)))
        if tok.pixel.quantizer is None:
            return {"pixel": taps.pixel_latent}
        return {"pixel": taps.pixel_latent, "semantic": taps.semantic_latent}

    def loss(self, model: nn.Module, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, float]]:
        images = batch["images"].to(self.engine.runtime.device, non_blocking=True)
        targets = None
        if self.cache is not None:  # one process (checked): the module itself
            out = model.forward_from_taps(batch["taps"])
            targets = batch["targets"] if self.config.loss.needs_teacher else None
        else:
            out = model(images, pixel_only=self.pixel_only)
        if self.teacher is not None and self.config.loss.needs_teacher:
            targets = teacher_targets(self.teacher, images, self.tokenizer.config.semantic_layer)
        discriminator = self.gan.discriminator if self.gan is not None and self.gan.on else None
        total, terms = self.objective.generator(
            out, images, targets, discriminator=discriminator, last_layer=self.tokenizer.decoder.conv_out.weight,
            reencoder=self.tokenizer.pixel_latents,
        )
        if discriminator is not None:
            self.gan.micro_batches.append((images, out.reconstruction.detach()))
        self.usage.update("pixel", out.pixel_codes)
        if out.semantic_codes is not None:
            self.usage.update("semantic", out.semantic_codes)
        return total, {name: float(value) for name, value in terms.items() if name != "total"}


class GanStep(Callback):
    """The adversarial part: from ``loss.gan.start_step`` on, the generator's objective gets the adversarial term
    (the discriminator frozen for it), and after the generator's step one discriminator update runs on the step's
    (images, detached reconstructions) micro-batches. Its model, optimiser, schedule and scaler are checkpointed."""

    def __init__(self, engine: Engine, objective: DualTokenObjective) -> None:
        config, runtime = engine.config, engine.runtime
        self.config, self.objective = config, objective
        self.discriminator = PatchDiscriminator(config.loss.gan.discriminator).to(runtime.device)
        # DDP under torchrun (every parameter is used; no buffers to broadcast), the module itself otherwise
        self.disc_model = wrap_model(self.discriminator, runtime, "ddp", find_unused=False)
        self.optimizer = build_optimizer(self.discriminator, config.disc_optimizer)
        gan_steps = max(1, config.max_steps - config.loss.gan.start_step)
        self.scheduler = build_scheduler(self.optimizer, gan_steps, config.disc_optimizer)
        self.scaler = torch.amp.GradScaler(runtime.device.type, enabled=engine.autocast_dtype == torch.float16)
        self.on = False
        self.micro_batches: list[tuple[torch.Tensor, torch.Tensor]] = []

    def on_step_begin(self, engine: Engine) -> None:
        self.on = self.config.loss.gan.active(engine.step)
        self.micro_batches = []
        if self.on:
            self._maybe_restart(engine)
            self.discriminator.requires_grad_(False)  # the generator's backward leaves it alone

    def after_optimizer_step(self, engine: Engine) -> dict[str, float]:
        if not self.on:
            return {}
        self.discriminator.requires_grad_(True)
        sums: dict[str, float] = defaultdict(float)
        count = len(self.micro_batches)
        for index, (images, reconstruction) in enumerate(self.micro_batches):
            with gradient_sync(self.disc_model, index == count - 1):
                with engine.autocast():
                    logits = self.disc_model(torch.cat([images, reconstruction]))
                    real, fake = logits.split(images.shape[0])
                    total, terms = self.objective.discriminator(real, fake, engine.step)
                self.scaler.scale(total / count).backward()
            for name, value in terms.items():
                sums[name] += float(value) / count
        self.micro_batches = []
        sums["disc_lr"], sums["disc_grad_norm"] = optimizer_step(
            self.optimizer, self.scheduler, self.scaler, self.config.disc_optimizer.grad_clip
        )
        return dict(sums)

    def _maybe_restart(self, engine: Engine) -> None:
        gan = self.config.loss.gan
        since = engine.step - gan.start_step
        if not gan.restart_every or since == 0 or since % gan.restart_every:
            return
        devices = [engine.runtime.device] if engine.runtime.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(self.config.seed + engine.step)  # the same fresh weights on every rank
            self.discriminator.reset_parameters()
        self.optimizer.state.clear()

    def _parts(self) -> dict[str, Any]:
        return {"model": self.discriminator, "optimizer": self.optimizer, "scheduler": self.scheduler, "scaler": self.scaler}

    def state_dict(self) -> dict[str, Any]:
        return {name: part.state_dict() for name, part in self._parts().items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for name, part in self._parts().items():
            part.load_state_dict(state[name])


class KMeansInit(Callback):
    """``codebook_init: kmeans``: before the first step of a new run, k-means of the pixel tap's latents over
    ``codebook_init.batches`` training batches fills the pixel codebook, and with two vocabularies trained (``branch:
    "both"``) k-means of the semantic latents the semantic one (see ResidualQuantizer.init_from_data; with
    several processes, rank 0's codebook is kept). A resumed run never initialises again."""

    def __init__(self, task: TokenizerTask) -> None:
        self.task = task
        self.report: dict[str, list[dict[str, float]]] = {}
        cfg, depth = task.config.codebook_init, task.tokenizer.quantizer("pixel").depth
        if cfg.shares and len(cfg.shares) != depth:
            raise ConfigError(f"codebook_init.shares has {len(cfg.shares)} entries for {depth} depths")

    def on_ready(self, engine: Engine) -> None:
        if engine.resumed_from is None:
            self.report = self._initialise()

    @torch.no_grad()
    def _initialise(self) -> dict[str, list[dict[str, float]]]:
        """Fill each trained codebook; per vocabulary, init_from_data's report per depth."""
        task = self.task
        cfg, tok = task.config.codebook_init, task.tokenizer
        latents: dict[str, list[torch.Tensor]] = {}
        for _ in range(cfg.batches):
            for name, values in task.latents(next(task.loader)).items():
                latents.setdefault(name, []).append(values.flatten(0, 1))
        generator = torch.Generator().manual_seed(task.config.seed)
        report = {}
        for name, values in latents.items():  # the pixel vocabulary first, then the semantic one
            vectors = torch.cat(values)
            shares = (cfg.shares or None) if name == "pixel" else None
            report[name] = tok.quantizer(name).init_from_data(
                vectors, vectors.shape[0] // cfg.batches, cfg.iterations, generator, shares
            )
        return report

    def on_start(self, engine: Engine) -> None:
        if self.report and engine.step == 0:
            values = {
                f"{name}/depth{q}/{k}": v for name, rows in self.report.items() for q, row in enumerate(rows)
                for k, v in row.items()
            }
            engine.logger.log(engine.step, values, kind="codebook_init")


class HeldOutImages(Callback):
    """A fixed batch of held-out images (``data.eval``; identical on every rank): PSNR, pixel MSE, the first pixel
    depth's usage (share of its codes the images use) and stability (share of positions whose first code comes back
    when the 8-bit reconstruction is encoded again, as ``dualtoken eval`` counts it) at step 0, every
    ``log.eval_every`` steps and at the last (with ``samples_seen``, the learning curve's x), and a grid of
    reconstructions every ``log.grid_every`` steps and at the last."""

    def __init__(self, task: TokenizerTask) -> None:
        self.task = task
        cfg = task.config
        count = max(cfg.data.eval_images, cfg.log.grid_images)
        size = task.tokenizer.image_size if cfg.data.eval_image_size is None else (cfg.data.eval_image_size,) * 2
        images = []
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", SkippedImageWarning)  # held-out images: a skipped one is not news
            for image, _ in open_image_source(cfg.data.eval, size):
                images.append(image)
                if len(images) == count:
                    break
        self.images = torch.stack(images) if images else None
        self._eval_model: DualTokenizer | None = None  # the model at data.eval_image_size, built at first use

    @torch.no_grad()
    def reconstruct(self, count: int, stability: bool = False) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
        """The first ``count`` held-out images, their reconstructions in eval mode (no codebook update) and, with
        ``stability``, the first pixel depth's usage and stability on them."""
        task = self.task
        tok = unwrap(task.engine.model)
        tok.eval()
        images = self.images[:count].to(task.engine.runtime.device)
        codes: dict[str, float] = {}
        with task.engine.autocast():
            model = self._at_eval_size(tok)
            out = model(images, pixel_only=task.pixel_only)  # every rank runs it (FSDP gathers)
            if stability:  # the reconstruction goes only as far as the pixel quantizer (eval mode: no update)
                first = out.pixel_codes[..., 0].flatten(1)  # (B, h*w)
                latents = model.pixel_latents(to_uint8_levels(out.reconstruction.float()))
                again = model.quantizer("pixel")(latents, update=False).codes[..., 0]  # (B, h*w)
                codes["pixel_usage@1"] = first.unique().numel() / tok.codebook_size("pixel")
                codes["pixel_stability@1"] = float((again == first).float().mean())
        task.train_mode()
        return images, out.reconstruction.float(), codes

    def evaluate(self) -> dict[str, float]:
        if self.images is None:
            return {}
        images, reconstruction, codes = self.reconstruct(self.task.config.data.eval_images, stability=True)
        return {
            "psnr": float(psnr(reconstruction, images).mean()),
            "pixel_mse": float(torch.mean((reconstruction - images) ** 2)),
            **codes,
        }

    def _at_eval_size(self, tok: DualTokenizer) -> DualTokenizer:
        """``tok``, or its current weights at ``data.eval_image_size`` when that differs from the training
        resolution (that model is built once, on this process's device, and refreshed at each call)."""
        size = self.task.config.data.eval_image_size
        if size is None or tok.image_size == (size, size):
            return tok
        if self._eval_model is None:
            self._eval_model = tok.at_resolution(size).to(self.task.engine.runtime.device)
        else:
            self._eval_model.load_state_dict(tok.state_dict())
        return self._eval_model.eval()

    def on_start(self, engine: Engine) -> None:
        if engine.step == 0:
            engine.log_eval(self.evaluate())  # the start of the held-out curve

    def on_step_end(self, engine: Engine, last: bool) -> None:
        log = engine.config.log
        if (log.eval_every and engine.step % log.eval_every == 0) or last:
            engine.log_eval(self.evaluate())
        if self.images is not None and ((log.grid_every and engine.step % log.grid_every == 0) or last):
            images, reconstruction, _ = self.reconstruct(log.grid_images)
            if engine.runtime.is_main:
                grid = reconstruction_grid(images.cpu(), reconstruction.cpu())
                save_image(grid, engine.out_dir / "grids" / f"step-{engine.step:08d}.png")
                engine.logger.image(engine.step, "reconstructions", grid)
