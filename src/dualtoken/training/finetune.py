"""``dualtoken finetune PHOTOS --minutes M --out DIR``: adapt a trained tokenizer's pixel path to a folder of photos
within the minutes a CPU user gives it, and export a model that loads by path.

What adapts cheaply is what trains: the pixel down-projection, the pixel codebooks (EMA) and up-projection, and the
decoder, on crops of ``crop_size`` pixels (a convolutional tower runs at any multiple of its stride: the shipped
model trained its pixel path on 128 px crops, scored at 256). The tower and the semantic vocabulary keep their
weights, so the tower runs once per crop (the engine's pixel-tap task, :mod:`dualtoken.training.pixel`):

    split    PHOTOS -> training images + held-out images (a seeded share of PHOTOS, or the --eval folder)
    before   per-image PSNR of the base model on the held-out images, at its own resolution
    train    the engine with PixelTapTask until the budget's training time is used; an export every
             ``export_every_minutes`` (written beside DIR and renamed onto it: an interrupt keeps the last one)
    after    the final export loaded by path, its per-image PSNR; the paired difference with a 95 % bootstrap
             interval over the held-out images
    DIR      config.json, model.safetensors (the base's dtype), README.md (names the base; the figures),
             finetune.json (the split, the per-image PSNRs, the settings)

Every number is a field of :class:`FinetuneConfig` (``train``: the engine's :class:`TrainConfig`).
"""

from __future__ import annotations

import copy
import json
import shutil
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from ..checkpoint import model_card, save_pretrained
from ..config import apply_overrides, to_dict
from ..data import SkippedImageWarning, open_image_source
from ..errors import ConfigError, DataError, ImageError
from ..io import list_images
from ..losses import GanConfig, LossConfig
from ..metrics import bootstrap_mean, psnr
from ..registry import CARD_NAME, CONFIG_NAME, DEFAULT_MODEL, WEIGHTS_NAME
from ..tokenizer import DualTokenizer
from . import tokenizer_engine
from .checkpoints import folder_beside, replace_folder
from .config import (
    CheckpointConfig,
    DataConfig,
    FeatureCacheConfig,
    FreezeConfig,
    LogConfig,
    OptimizerConfig,
    TrainConfig,
)
from .distributed import unwrap
from .engine import Callback, Engine

REPORT_NAME = "finetune.json"
# the state-dict prefixes a fine-tune changes; every other weight is the base model's, bit for bit
TRAINED_PREFIXES = ("pixel.", "pixel_shortcut.", "decoder.")


def finetune_recipe() -> TrainConfig:
    """The training part of a fine-tune: the pixel branch on cached pixel-tap tokens, mean squared error and the
    commitment (no perceptual network, no GAN: both cost a CPU more than the decoder), two crops per image with the
    shipped model's crop area (a fifth to a third of the photo: the pixel scale of the photo resized to 256),
    batches of 16 as the shipped pixel path trained with (a smaller batch meets each code less often per step, so
    more codes fall under the dead-code restart threshold; batches of 8 gained less, docs/TRAINING.md), a learning
    rate that 30 steps cannot overshoot with (2e-4 lost PSNR, 5e-5 gained, docs/TRAINING.md), a short warm-up and a constant learning rate after it (the
    clock ends the run), no resume."""
    return TrainConfig(
        teacher="none",
        branch="pixel",
        max_steps=1_000_000,  # the clock ends the run
        data=DataConfig(batch_size=16, crop_scale=(0.2, 0.3)),
        optimizer=OptimizerConfig(lr=5e-5, warmup_steps=5, schedule="constant", betas=(0.5, 0.9)),
        loss=LossConfig(semantic_weight=0.0, perceptual=0.0, perceptual_kind="none", gan=GanConfig(enabled=False)),
        freeze=FreezeConfig(preset="stage0"),
        cache=FeatureCacheConfig(pixel_tap=True, crops_per_image=2, batch_size=16),
        checkpoint=CheckpointConfig(every=1_000_000, keep_last=1, resume=False),  # one at the end, discarded
        log=LogConfig(every=10, console=False, tensorboard=False, codebook_every=50, eval_every=0, grid_every=0),
    )


@dataclass
class FinetuneConfig:
    """A fine-tune: the budget, the split, the evaluation, the exports, and the training recipe."""

    minutes: float = 10.0  # the whole command's wall-clock budget: cache, evaluations and exports included
    crop_size: int = 128  # training resolution of a convolutional tower; a tower with position embeddings: its own
    heldout_share: float = 0.2  # of PHOTOS held out when no eval folder is given ...
    min_heldout: int = 5  # ... at least this many images ...
    max_heldout: int = 100  # ... at most this many (also the most images of an eval folder scored)
    min_train: int = 5  # training images PHOTOS must keep
    eval_batch_size: int = 8
    export_every_minutes: float = 2.0  # interim exports to DIR (what an interrupt leaves)
    bootstrap_resamples: int = 2000
    seed: int = 0  # the held-out split and the interval's resamples (training: train.seed)
    train: TrainConfig = field(default_factory=finetune_recipe)

    def __post_init__(self) -> None:
        if not self.minutes > 0:
            raise ConfigError(f"minutes must be > 0, got {self.minutes:g}")
        if not 0 < self.heldout_share < 1:
            raise ConfigError(f"heldout_share must be between 0 and 1, got {self.heldout_share}")
        counts = (self.min_heldout, self.max_heldout, self.min_train, self.eval_batch_size, self.bootstrap_resamples)
        if min(counts) < 1 or self.min_heldout > self.max_heldout:
            raise ConfigError(
                "min_heldout, max_heldout, min_train, eval_batch_size and bootstrap_resamples must be >= 1, "
                "min_heldout <= max_heldout"
            )
        if self.crop_size < 1 or self.export_every_minutes <= 0:
            raise ConfigError("crop_size must be >= 1 and export_every_minutes > 0")
        if self.train.branch != "pixel" or not self.train.cache.pixel_tap:
            raise ConfigError('a fine-tune trains the pixel path on cached taps: train.branch must stay "pixel" '
                              "and train.cache.pixel_tap true (the semantic path: dualtoken train, branch semantic)")


def load_finetune_config(overrides: list[str] | None = None, **values: Any) -> FinetuneConfig:
    """The defaults with ``values`` (field=value) and then ``key.sub=value`` overrides applied, validated."""
    config = FinetuneConfig(**values)
    return apply_overrides(config, overrides or [])


@dataclass
class Split:
    """Which images train and which are held out for the before/after PSNR."""

    train: list[Path]
    heldout: list[Path]
    heldout_from: str  # "photos" (a share of them) or "eval" (the eval folder)


def split_images(photos: str | Path, eval_folder: str | Path | None, config: FinetuneConfig) -> Split:
    """The training and held-out images: the eval folder's (a seeded sample of at most ``max_heldout``), or a seeded
    share of PHOTOS. DataError for a path that is not a folder of images, too few images to hold out, or an eval
    folder sharing images with PHOTOS."""
    files = _images_of(photos, "PHOTOS")
    generator = torch.Generator().manual_seed(config.seed)
    if eval_folder is not None:
        heldout = _images_of(eval_folder, "--eval")
        shared = {p.resolve() for p in files} & {p.resolve() for p in heldout}
        if shared:
            raise DataError(f"--eval {eval_folder} shares {len(shared)} images with {photos}: held-out images must not train")
        if len(files) < config.min_train:
            raise DataError(f"{photos} has {len(files)} images: a fine-tune needs at least {config.min_train}")
        order = torch.randperm(len(heldout), generator=generator)[: config.max_heldout]
        return Split(files, sorted(heldout[i] for i in order.tolist()), "eval")
    count = min(config.max_heldout, max(config.min_heldout, round(config.heldout_share * len(files))))
    if len(files) - count < config.min_train:
        raise DataError(
            f"{photos} has {len(files)} images, too few to hold out {count} for the before/after PSNR and train on "
            f"{config.min_train}: give at least {count + config.min_train}, or held-out images with --eval FOLDER"
        )
    order = torch.randperm(len(files), generator=generator).tolist()
    held = set(order[:count])
    return Split(
        [f for i, f in enumerate(files) if i not in held], [f for i, f in enumerate(files) if i in held], "photos"
    )


def _images_of(folder: str | Path, what: str) -> list[Path]:
    path = Path(folder)
    if not path.exists():
        raise DataError(f"{what} {folder}: no such folder")
    if not path.is_dir():
        raise DataError(f"{what} {folder}: not a folder")
    try:
        return list_images(path)
    except ImageError as exc:
        raise DataError(f"{what}: {exc}") from None


def check_output(out: str | Path) -> Path:
    """``out`` as the export's folder: new, empty, or a model folder (which the export replaces)."""
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise DataError(f"--out {out}: a file is in the way (give a new folder)")
    if path.is_dir() and any(path.iterdir()) and not (path / CONFIG_NAME).is_file():
        raise DataError(f"--out {out}: the folder holds files and no model (give a new folder or a model folder)")
    return path


def stored_float_dtype(weights: Path) -> torch.dtype:
    """The dtype of the floating-point tensors of a safetensors file (of the first one)."""
    names = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64}
    with safe_open(str(weights), framework="pt") as handle:
        for key in handle.keys():
            dtype = handle.get_slice(key).get_dtype()
            if dtype in names:
                return names[dtype]
    return torch.float32


def changed_outside(trained_prefixes: tuple[str, ...], base: Path, export: Path) -> list[str]:
    """The weights of ``export`` that differ from ``base`` (two safetensors files) outside the trained prefixes."""
    before, after = load_file(str(base)), load_file(str(export))
    return sorted(
        name for name, value in before.items()
        if not name.startswith(trained_prefixes) and (name not in after or not torch.equal(value, after[name]))
    )


def load_heldout(files: list[Path], size: tuple[int, int], list_path: Path) -> tuple[torch.Tensor, list[str]]:
    """The held-out images at ``size`` (shortest side resized, centre crop: the evaluation transform) and their
    paths; unreadable ones are skipped with a warning. DataError when none is readable."""
    list_path.write_text("".join(f"{f.resolve()}\n" for f in files))
    images, ids = [], []
    for image, image_id in open_image_source(list_path, size):
        images.append(image)
        ids.append(image_id)
    if not images:
        raise DataError("no readable held-out image")
    return torch.stack(images), ids


@torch.no_grad()
def per_image_psnr(tokenizer: DualTokenizer, images: torch.Tensor, batch_size: int) -> torch.Tensor:
    """PSNR (dB) of each image reconstructed through the pixel path in eval mode (no codebook update), float32."""
    tokenizer.eval()
    device = next(tokenizer.parameters()).device
    values = [
        psnr(tokenizer(images[i : i + batch_size].to(device), pixel_only=True).reconstruction, images[i : i + batch_size].to(device))
        for i in range(0, len(images), batch_size)
    ]
    return torch.cat(values).cpu()


class Exporter:
    """Writes the trained weights as a model folder at the base's resolution, in the base's dtype, named after
    ``out`` with the base named as what it was fine-tuned from: into a folder beside ``out`` first, then renamed
    onto it (:func:`replace_folder`), so ``out`` always holds a whole export."""

    def __init__(self, base: DualTokenizer, out: Path) -> None:
        self.vessel = base  # the base model's architecture at its own resolution, holding each export's weights
        self.out = out
        self.dtype = stored_float_dtype(base.model_dir / WEIGHTS_NAME)
        self.step: int | None = None  # the step of the export at ``out``

    def write(self, trained: DualTokenizer) -> Path:
        """The folder of an export of ``trained`` beside ``out`` (not yet renamed onto it)."""
        self.vessel.load_state_dict({k: v.detach().cpu() for k, v in trained.state_dict().items()})
        folder = folder_beside(self.out, "export")
        return save_pretrained(self.vessel, folder, self.dtype, name=self.out.name)

    def publish(self, folder: Path, step: int) -> Path:
        replace_folder(folder, self.out)
        self.step = step
        return self.out


class IntervalExport(Callback):
    """An export to ``out`` every ``seconds`` of training (not at the last step: the final export follows)."""

    def __init__(self, exporter: Exporter, seconds: float) -> None:
        self.exporter, self.seconds = exporter, seconds
        self.last = time.perf_counter()

    def on_start(self, engine: Engine) -> None:
        self.last = time.perf_counter()

    def on_step_end(self, engine: Engine, last: bool) -> None:
        if not last and time.perf_counter() - self.last >= self.seconds:
            self.exporter.publish(self.exporter.write(unwrap(engine.model)), engine.step)
            self.last = time.perf_counter()


@dataclass
class FinetuneResult:
    """What a fine-tune did and measured."""

    export: Path
    base: str
    steps: int
    batch_size: int  # crops a step
    train_seconds: float  # the training loop's
    total_seconds: float  # the whole fine-tune's, up to the report
    crops: int  # crops cut from the training images (cache.crops_per_image each)
    train_images: int
    heldout: list[str]
    psnr_before: torch.Tensor  # (N,) dB, per held-out image
    psnr_after: torch.Tensor
    difference: dict[str, float]  # mean, low, high, n of after - before (paired bootstrap)
    changed_outside_pixel_path: list[str]  # weights other than the pixel path's that differ from the base (none)
    image_size: tuple[int, int]

    def summary_lines(self) -> list[str]:
        d = self.difference
        changed = self.changed_outside_pixel_path
        frozen = (
            f"tower and semantic vocabulary: bit-identical to {self.base}" if not changed
            else f"warning: {len(changed)} weights outside the pixel path changed ({', '.join(changed[:3])} ...)"
        )
        return [
            f"trained {self.steps} steps of {self.batch_size} crops ({self.crops} crops cut from {self.train_images} "
            f"images) in {_duration(self.train_seconds)}, {_duration(self.total_seconds)} all told",
            f"held-out PSNR ({d['n']} images, {self.image_size[0]}x{self.image_size[1]}): "
            f"{self.psnr_before.mean():.2f} -> {self.psnr_after.mean():.2f} dB, {d['mean']:+.2f} dB "
            f"(95 % paired bootstrap interval {d['low']:+.2f} to {d['high']:+.2f})",
            frozen,
            f"wrote {self.export} (DualTokenizer.from_pretrained({str(self.export)!r}))",
        ]


def _duration(seconds: float) -> str:
    minutes, rest = divmod(round(seconds), 60)
    return f"{minutes} min {rest} s" if minutes else f"{rest} s"


def finetune(
    photos: str | Path,
    out: str | Path,
    config: FinetuneConfig | None = None,
    eval_folder: str | Path | None = None,
    model: str = DEFAULT_MODEL,
    say: Callable[[str], None] | None = None,
) -> FinetuneResult:
    """Fine-tune ``model``'s pixel path on the images of ``photos`` and export it to ``out`` (see the module's
    docstring); ``say`` receives the progress lines (the held-out PSNR before training among them). A
    KeyboardInterrupt leaves ``out`` with the last interim export (or as it was) and says which."""
    config = config or FinetuneConfig()
    say = say or (lambda line: None)
    begun = time.perf_counter()
    deadline = begun + config.minutes * 60
    out = check_output(out)
    split = split_images(photos, eval_folder, config)
    base = DualTokenizer.from_pretrained(model)
    base_name = base.config.name
    exporter = Exporter(base, out)
    work = folder_beside(out, "run")
    engine: Engine | None = None
    try:
        started = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("always", SkippedImageWarning)
            images, ids = load_heldout(split.heldout, base.image_size, work / "heldout.txt")
        before = per_image_psnr(base, images, config.eval_batch_size)
        evaluation = time.perf_counter() - started
        source = f"{len(ids)} held out of {photos}" if split.heldout_from == "photos" else f"{len(ids)} of {eval_folder}"
        say(f"held-out PSNR before: {before.mean():.2f} dB ({source}, {base.image_size[0]}x{base.image_size[1]}, "
            f"{base_name})")
        (work / "train.txt").write_text("".join(f"{f.resolve()}\n" for f in split.train))
        train_config = _run_recipe(config.train, model, work)
        trained = _training_model(base, config.crop_size)
        engine = tokenizer_engine(train_config, tokenizer=trained)
        seconds = deadline - time.perf_counter() - 1.5 * evaluation - 10.0  # the after-evaluation and the export
        if seconds <= 0:
            engine.close()
            raise ConfigError(
                f"{config.minutes:g} minutes leave no time to train after the crops' tower pass and the evaluations: "
                "give more minutes"
            )
        engine.config.max_seconds = seconds
        engine.task.callbacks.append(IntervalExport(exporter, config.export_every_minutes * 60))
        say(f"training {base_name}'s pixel path and decoder on {len(engine.task.cache)} crops of {len(split.train)} "
            f"images ({trained.image_size[0]} px), for {_duration(seconds)}; tower and semantic vocabulary frozen")
        clock = time.perf_counter()
        summary = engine.run()
        train_seconds = time.perf_counter() - clock
        folder = exporter.write(unwrap(engine.model))
        exported = DualTokenizer.from_pretrained(folder)
        after = per_image_psnr(exported, images, config.eval_batch_size)
        changed = changed_outside(TRAINED_PREFIXES, exporter.vessel.model_dir / WEIGHTS_NAME, folder / WEIGHTS_NAME)
        result = FinetuneResult(
            export=out, base=base_name, steps=summary["step"], batch_size=engine.samples_per_step,
            train_seconds=train_seconds, total_seconds=time.perf_counter() - begun, crops=len(engine.task.cache),
            train_images=len(split.train), heldout=ids, psnr_before=before, psnr_after=after,
            difference=bootstrap_mean(after - before, config.bootstrap_resamples, config.seed),
            changed_outside_pixel_path=changed, image_size=tuple(base.image_size),
        )
        _write_report(folder, exported, result, config)
        exporter.publish(folder, summary["step"])
        return result
    except KeyboardInterrupt:
        step = engine.step if engine is not None else 0
        kept = (
            f"{out} holds the export of step {exporter.step}" if exporter.step is not None
            else f"nothing exported yet; {out} is as it was"
        )
        say(f"interrupted at step {step}: {kept}")
        raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
        for leftover in out.parent.glob(f".{out.name}.export-*"):
            shutil.rmtree(leftover, ignore_errors=True)


def _run_recipe(train: TrainConfig, model: str, work: Path) -> TrainConfig:
    """The recipe with this run's model (recorded; the engine is given the model), data and output folder."""
    return apply_overrides(train, [f"model={model}", f"output_dir={work}", f"data.train={work / 'train.txt'}"])


def _training_model(base: DualTokenizer, crop_size: int) -> DualTokenizer:
    """A copy of the base to train (the same weights): at ``crop_size`` when the tower is convolutional and the
    model larger, at its own size otherwise."""
    if crop_size < min(base.image_size):
        try:
            return base.at_resolution(crop_size).train()
        except ConfigError:  # position embeddings: the tower runs at its trained resolution only
            pass
    return copy.deepcopy(base).train()


def _write_report(folder: Path, exported: DualTokenizer, result: FinetuneResult, config: FinetuneConfig) -> None:
    """The card with the figures, and finetune.json (split, per-image PSNR, settings) in the export's folder."""
    d = result.difference
    metrics = {
        "held-out images": d["n"],
        "held-out PSNR before (dB)": float(result.psnr_before.mean()),
        "held-out PSNR after (dB)": float(result.psnr_after.mean()),
        "change (dB), 95 % paired bootstrap interval": f"{d['mean']:+.3f} ({d['low']:+.3f} to {d['high']:+.3f})",
        "training steps": result.steps,
        "training images": result.train_images,
    }
    (folder / CARD_NAME).write_text(model_card(exported, metrics, exported.config))
    report = {
        "base_model": result.base,
        "steps": result.steps,
        "train_seconds": result.train_seconds,
        "batch_size": result.batch_size,
        "total_seconds": result.total_seconds,
        "crops": result.crops,
        "train_images": result.train_images,
        "heldout": [
            {"image": image, "psnr_before": float(b), "psnr_after": float(a)}
            for image, b, a in zip(result.heldout, result.psnr_before, result.psnr_after)
        ],
        "difference": d,
        "changed_outside_pixel_path": result.changed_outside_pixel_path,
        "config": to_dict(config),
    }
    (folder / REPORT_NAME).write_text(json.dumps(report, indent=2) + "\n")
