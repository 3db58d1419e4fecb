"""The evaluation config: which metric groups run, and every number they use (JSON round trip via dualtoken.config)."""

from __future__ import annotations

import typing
from dataclasses import dataclass
from typing import ClassVar

from ..errors import ConfigError

METRIC_GROUPS = ("reconstruction", "perceptual", "distribution", "semantic", "codebook", "rate_distortion", "stability")


@dataclass
class EvalConfig:
    """Settings of one evaluation run.

    ``metrics`` picks groups from :data:`METRIC_GROUPS`. ``rate_distortion`` repeats the reconstruction,
    perceptual, distribution and semantic groups with the first k of Q depths, k = 1..Q. The standard networks
    (Inception for rFID, VGG/AlexNet for LPIPS) run only when their weight files are given; otherwise only the
    EfficientNet-Lite0 substitutes run, under their own names. In a config file, relative paths are taken from the
    file's folder.
    """

    path_fields: ClassVar[tuple[str, ...]] = (
        "inception_weights", "lpips_weights", "lpips_lin_weights", "classes", "labels", "classifier_cache"
    )

    metrics: tuple[str, ...] = METRIC_GROUPS
    batch_size: int = 16
    # evaluate only the first ``limit`` images of the data (None: all)
    limit: int | None = None
    # EfficientNet-Lite0 input side (the resolution it was trained at); images are resized bicubically to it
    feature_resize: int = 224
    kid_subsets: int = 100
    kid_subset_size: int = 1000
    kid_degree: int = 3
    # best and worst images (by PSNR at full depth) shown in the reconstruction grid
    grid_images: int = 4
    # bins of the codebook-usage histograms (codes sorted by frequency, grouped into this many bins)
    histogram_bins: int = 64
    # standard networks, only with local weight files
    inception_weights: str | None = None
    lpips_weights: str | None = None
    lpips_net: typing.Literal["vgg", "alex"] = "vgg"
    # LPIPS linear-layer weights (lpips v0.1 format); default: the copy shipped inside torchmetrics
    lpips_lin_weights: str | None = None
    # class names (classes.tsv with a `name` column, or one name per line) and labels (labels.tsv: file, class_index);
    # default: looked up in the data folder
    classes: str | None = None
    labels: str | None = None
    # zero-shot text classifier: cache folder (default ~/.cache/dualtoken/zeroshot), tokenizer context and cleaning
    classifier_cache: str | None = None
    text_context_length: int = 64
    text_batch_size: int = 256
    text_clean: typing.Literal["canonicalize", "none"] = "canonicalize"
    top_k: int = 5
    # seed of KID's random subsets (the only randomness of an evaluation)
    seed: int = 0
    # DataLoader worker processes reading images (0: in the main process)
    num_workers: int = 0
    # save the partial state (in the output folder) every this many batches, to resume an interrupted run; 0: never
    checkpoint_every: int = 50

    def __post_init__(self) -> None:
        unknown = sorted(set(self.metrics) - set(METRIC_GROUPS))
        if unknown:
            raise ConfigError(f"EvalConfig.metrics: unknown group(s) {unknown}; expected some of {list(METRIC_GROUPS)}")
        for name in ("batch_size", "feature_resize", "kid_subsets", "kid_subset_size", "kid_degree", "histogram_bins",
                     "text_context_length", "text_batch_size", "top_k"):
            if getattr(self, name) < 1:
                raise ConfigError(f"EvalConfig.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("grid_images", "num_workers", "checkpoint_every"):
            if getattr(self, name) < 0:
                raise ConfigError(f"EvalConfig.{name} must be >= 0, got {getattr(self, name)}")
        if self.limit is not None and self.limit < 1:
            raise ConfigError(f"EvalConfig.limit must be >= 1 or null, got {self.limit}")

    def wants(self, group: str) -> bool:
        return group in self.metrics
