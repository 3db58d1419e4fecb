"""Training configuration: one dataclass tree, JSON round trip (unknown keys rejected), ``--set a.b=value``.

Every number of a run lives here; the defaults are the release's stage-1 recipe (docs/METHOD.md "Stages") except for the
data and model, which a recipe file names. ``load_train_config(path, overrides)`` is what ``dualtoken train`` uses.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Literal

from ..config import apply_overrides, load_config_file, to_dict
from ..errors import ConfigError
from ..losses import LossConfig


@dataclass
class DataConfig:
    """What the trainer reads: a source spec (folder, file list, WebDataset shards) per split."""

    train: str = ""
    eval: str | None = None  # held-out images for reconstruction PSNR and the image grid
    batch_size: int = 32  # per process and micro-step
    num_workers: int = 0  # data-loader workers per process
    shuffle_buffer: int = 1000  # WebDataset: shuffle window inside a shard
    crop_scale: tuple[float, float] = (0.9, 1.0)  # RandomResizedCrop area range
    eval_images: int = 16  # held-out images scored at each evaluation
    # the held-out evaluation's resolution when it differs from training's (a convolutional tower trained on small
    # crops, scored at the size it ships at); None = the model's own
    eval_image_size: int | None = None

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.num_workers < 0 or self.eval_images < 1:
            raise ConfigError("data.batch_size and data.eval_images must be >= 1, data.num_workers >= 0")
        if self.eval_image_size is not None and self.eval_image_size < 1:
            raise ConfigError(f"data.eval_image_size must be >= 1 or null, got {self.eval_image_size}")
        if not 0 < self.crop_scale[0] <= self.crop_scale[1] <= 1:
            raise ConfigError(f"data.crop_scale must satisfy 0 < low <= high <= 1, got {self.crop_scale}")


@dataclass
class OptimizerConfig:
    """AdamW with decay on >= 2-dim parameters only; linear warm-up then cosine (or constant) learning rate."""

    lr: float = 7.2e-5
    betas: tuple[float, float] = (0.5, 0.9)
    eps: float = 1e-8
    weight_decay: float = 1e-4
    warmup_steps: int = 10000
    schedule: Literal["cosine", "constant"] = "cosine"
    min_lr: float = 0.0  # where the cosine ends
    grad_clip: float = 0.0  # max global gradient norm; 0 = no clipping

    def __post_init__(self) -> None:
        if self.lr <= 0 or self.warmup_steps < 0 or self.min_lr < 0 or self.grad_clip < 0:
            raise ConfigError("optimizer: lr must be > 0; warmup_steps, min_lr and grad_clip >= 0")


def _discriminator_optimizer() -> OptimizerConfig:
    return OptimizerConfig(weight_decay=0.0, min_lr=4e-5)


@dataclass
class FreezeConfig:
    """Which parameters train. Presets (docs/METHOD.md "Stages"):

    - ``stage0``: the patch embedding and tower layers 1..semantic_layer are frozen;
    - ``stage1``: everything trains (the release's main run);
    - ``stage2``: the embedding, layers 1..shortcut_layer (pixel_layer without a shortcut), the pixel projections
      and the decoder are frozen, and the pixel codebook stops updating;
    - ``finetune``: projections, codebooks and decoder train, and of the tower only the last
      ``finetune_last_layers`` layers and the head ("fine-tune on your data").
    Codebooks are never trained by gradients (EMA only), whatever the preset.
    """

    preset: Literal["stage0", "stage1", "stage2", "finetune"] = "stage1"
    finetune_last_layers: int = 2
    # also freeze the tower layers after semantic_layer and the head at their starting weights (with the teacher's
    # weights there, the pooled output of the quantized path is compared with the very network that made the target)
    tail: bool = False
    # learning-rate multiplier of the tail when it trains: pretrained layers want a gentler step than new projections
    tail_lr_scale: float = 1.0

    def __post_init__(self) -> None:
        if self.finetune_last_layers < 0:
            raise ConfigError("freeze.finetune_last_layers must be >= 0")
        if self.tail_lr_scale <= 0:
            raise ConfigError(f"freeze.tail_lr_scale must be > 0, got {self.tail_lr_scale}")


@dataclass
class FeatureCacheConfig:
    """Tap features of the frozen tower, computed once per training crop (``branch: "semantic"``; ``branch:
    "pixel"`` with ``pixel_tap``; or ``branch: "both"`` with ``taps``: the crops and the tokens at every tap, see
    :mod:`dualtoken.training.tap_cache`).

    Each image gives ``crops_per_image`` random crops (``data.crop_scale``); per crop the semantic cache keeps the
    tower's tokens at the semantic tap and the teacher's pooled output, in shards of ``shard_images`` images written
    atomically, so an interrupted cache build resumes where it stopped. The pixel-tap cache keeps the crop (8-bit)
    and the tower's tokens at the pixel tap (and the shortcut's), in memory.
    """

    # branch "pixel": run the frozen tower once per crop, up to the pixel tap, and train on those tokens
    pixel_tap: bool = False
    folder: str | None = None  # the semantic and tap caches' folder; default: <output_dir>/features
    # branch "both": train on cached crops and the frozen tower's tokens at the taps (dualtoken.training.tap_cache)
    taps: bool = False
    # cache.taps: tower layers cached besides the model's taps (runs tapping different layers share one cache)
    layers: list[int] = field(default_factory=list)
    crops_per_image: int = 1
    shard_images: int = 256
    batch_size: int = 8  # crops per forward while computing features
    dtype: Literal["float16", "float32"] = "float16"

    def __post_init__(self) -> None:
        if self.crops_per_image < 1 or self.shard_images < 1 or self.batch_size < 1:
            raise ConfigError("cache.crops_per_image, cache.shard_images and cache.batch_size must be >= 1")
        if any(layer < 0 for layer in self.layers):
            raise ConfigError(f"cache.layers must be tower layers (>= 0), got {self.layers}")


@dataclass
class CodebookInitConfig:
    """How the codebooks a run trains start. ``random``: as the model was built (the reference). ``kmeans``: before
    the first step, k-means on each vocabulary's own latents (the pixel one's; with ``branch: "both"`` the semantic
    one's too) of ``batches`` training batches fills its codebook, a share of K per depth, each depth on the
    residuals the depths before leave (see :meth:`dualtoken.quantizer.ResidualQuantizer.init_from_data`). A resumed
    run never re-initialises."""

    method: Literal["random", "kmeans"] = "random"
    batches: int = 4
    iterations: int = 10  # Lloyd iterations per depth
    # relative share of the pixel codebook's K codes per depth, e.g. [4, 2, 1, 1]: half for the first depth; [] =
    # equal shares (the semantic codebook always takes equal shares)
    shares: list[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.batches < 1 or self.iterations < 1:
            raise ConfigError("codebook_init.batches and codebook_init.iterations must be >= 1")
        if any(w <= 0 for w in self.shares):
            raise ConfigError(f"codebook_init.shares must be positive, got {self.shares}")


@dataclass
class CheckpointConfig:
    """Resume checkpoints (atomic, keep-last-N) and exports of the tokenizer (``save_pretrained``)."""

    every: int = 1000  # steps between resume checkpoints (and at the end)
    keep_last: int = 3
    export_every: int = (
        0  # steps between tokenizer exports to <output_dir>/export-<step>; 0 = only the final one
    )
    resume: bool = True  # continue from the newest good checkpoint in <output_dir>/checkpoints

    def __post_init__(self) -> None:
        if self.every < 1 or self.keep_last < 1 or self.export_every < 0:
            raise ConfigError("checkpoint.every and checkpoint.keep_last must be >= 1, export_every >= 0")


@dataclass
class LogConfig:
    """Console, JSONL and TensorBoard metrics; codebook usage; held-out PSNR; reconstruction grids."""

    every: int = 10  # steps between metric records
    console: bool = True
    jsonl: bool = True
    tensorboard: bool = True
    progress: bool = True  # a progress bar with ETA
    codebook_every: int = 100  # steps between codebook-usage records (usage counted over that window)
    eval_every: int = 500  # steps between held-out evaluations (needs data.eval); 0 = only at the end
    grid_every: int = 500  # steps between reconstruction-grid PNGs; 0 = only at the end
    grid_images: int = 8

    def __post_init__(self) -> None:
        if self.every < 1 or self.codebook_every < 1 or self.grid_images < 1:
            raise ConfigError("log.every, log.codebook_every and log.grid_images must be >= 1")


@dataclass
class TrainConfig:
    """A whole training run. In a recipe file, relative paths are taken from the file's folder."""

    path_fields: ClassVar[tuple[str, ...]] = (
        "backbone_pretrained", "output_dir", "data.train", "data.eval", "loss.vgg_weights", "loss.lpips_heads",
        "cache.folder",
    )
    name_or_path_fields: ClassVar[tuple[str, ...]] = ("model", "init_from")

    # an architecture name (dualtoken-tiny, ...) or a tokenizer config JSON file: a new model; trained weights to
    # fine-tune: a trained model's name (dualtoken-efflite0), a save_pretrained folder, or a Hub repo id
    model: str = "dualtoken-tiny"
    model_overrides: list[str] = field(default_factory=list)  # "key.sub=value" on a new model's config
    backbone_pretrained: str | None = None  # a SigLIP folder: initial tower weights and the teacher
    # the distillation target: the pretrained tower of backbone.pretrained, a frozen copy of the initial
    # model's tower ("initial": for models without a pretrained folder), or none (no distillation terms)
    teacher: Literal["pretrained", "initial", "none"] = "pretrained"
    # a trained model (save_pretrained folder or embedded name) whose weights start the listed parts of the model
    init_from: str | None = None
    init_parts: list[Literal["backbone", "pixel", "semantic", "decoder"]] = field(
        default_factory=lambda: ["backbone", "pixel", "semantic", "decoder"]
    )
    # start a larger codebook (same code width) from init_from's: its codes first, the added ones restarted from data
    init_grow_codebooks: bool = False
    # what trains: the whole tokenizer; the semantic branch alone on cached tap features of the frozen tower; or
    # the pixel branch alone (pixel projections, quantizer and decoder; the tower runs only up to the pixel tap).
    # Both single-branch modes need freeze.preset "stage0": the tower below the tap must not change
    branch: Literal["both", "semantic", "pixel"] = "both"
    output_dir: str = "runs/dualtoken"
    max_steps: int = 200000
    # a wall-clock budget for the training loop in seconds (0: none); reaching it ends the run like max_steps
    # (checkpoint, export to <output_dir>/final), and a resumed run continues towards max_steps
    max_seconds: float = 0.0
    grad_accum: int = 1  # micro-steps per optimiser step
    seed: int = 0
    device: str = "auto"  # auto: cuda:<LOCAL_RANK> when CUDA is available, else cpu
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"  # auto: bf16 on CUDA, fp32 on CPU
    gradient_checkpointing: bool = False
    # bitwise-repeatable runs (one CPU thread, deterministic kernels): two runs, or a run killed and resumed, export
    # identical weights; costs speed (docs/TRAINING.md "Determinism")
    deterministic: bool = False
    parallel: Literal["ddp", "fsdp"] = "ddp"  # with several processes: DDP, or FSDP2 fully_shard
    find_unused_parameters: bool | None = None  # DDP; None: decided from the loss weights
    data: DataConfig = field(default_factory=DataConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    disc_optimizer: OptimizerConfig = field(default_factory=_discriminator_optimizer)
    loss: LossConfig = field(default_factory=LossConfig)
    freeze: FreezeConfig = field(default_factory=FreezeConfig)
    cache: FeatureCacheConfig = field(default_factory=FeatureCacheConfig)
    codebook_init: CodebookInitConfig = field(default_factory=CodebookInitConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)

    def __post_init__(self) -> None:
        if self.max_steps < 1 or self.grad_accum < 1 or self.max_seconds < 0:
            raise ConfigError("max_steps and grad_accum must be >= 1, max_seconds >= 0")
        if self.branch != "both" and self.freeze.preset != "stage0":
            raise ConfigError(
                f'branch "{self.branch}" needs the tower below its tap frozen: freeze.preset "stage0", got '
                f"{self.freeze.preset!r}"
            )
        if self.branch == "pixel" and self.teacher != "none":
            raise ConfigError('branch "pixel" has no semantic path to distil: set teacher=none and loss.semantic_weight=0')
        if self.cache.taps and self.branch != "both":
            raise ConfigError(f'cache.taps trains the whole tokenizer on cached taps (branch "both"), got {self.branch!r}')
        if self.branch == "semantic" and self.teacher == "none":
            raise ConfigError('branch "semantic" distils against a teacher: set teacher to "pretrained" or "initial"')
        if self.cache.pixel_tap:
            self._check_pixel_tap()
        if self.teacher == "none" and self.loss.needs_teacher:
            raise ConfigError(
                "teacher is 'none' but the loss has distillation terms: set loss.semantic_weight=0 or a teacher"
            )

    def _check_pixel_tap(self) -> None:
        """``cache.pixel_tap`` trains the pixel path on cached tap tokens: what needs the tower at each step or
        images beyond the cached crops is refused."""
        if self.branch != "pixel":
            raise ConfigError(f'cache.pixel_tap applies to branch "pixel" only, got branch {self.branch!r}')
        refused = {
            "loss.reencode": self.loss.reencode != 0,  # runs the tower on each reconstruction
            "loss.gan.enabled": self.loss.gan.enabled,
            "codebook_init.method": self.codebook_init.method != "random",
            "cache.folder": self.cache.folder is not None,  # the pixel-tap cache lives in memory
        }
        for key, set_ in refused.items():
            if set_:
                raise ConfigError(f"{key} does not apply with cache.pixel_tap (the tower's pixel-tap tokens cached)")

    def to_json(self) -> str:
        return json.dumps(to_dict(self), indent=2)


def load_train_config(path: str | Path | None = None, overrides: list[str] | None = None) -> TrainConfig:
    """A training config from a JSON file (or the defaults) with ``key.sub=value`` overrides, validated. Relative
    paths in the file are taken from its folder, those of the overrides from the working directory."""
    config = TrainConfig()
    if path is not None:
        config = load_config_file(TrainConfig, path, "training config")
    return apply_overrides(config, overrides or [])
