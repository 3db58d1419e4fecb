"""What the semantic evaluation compares against: the model's own backbone run unquantized, the frozen teacher,
and a classifier (the SigLIP text tower's zero-shot classifier, or the backbone's own ImageNet head)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ..backbones.base import Backbone
from ..backbones.siglip import resolve_pretrained
from ..backend import cache_root
from ..errors import CheckpointError, DualTokenError
from .config import EvalConfig
from .templates import OPENAI_IMAGENET_TEMPLATES
from .zeroshot import cached_text_classifier, has_tokenizer, read_class_names

IMAGENET_CLASSES = 1000
ZEROSHOT_LOGIT_SCALE = 100.0  # logits = 100 x cosine, as in the zero-shot evaluation


@dataclass
class Reference:
    """Unquantized features of a backbone: tokens at the semantic layer (B, h*w, W) and the pooled output."""

    tokens: torch.Tensor
    pooled: torch.Tensor


@torch.no_grad()
def run_unquantized(backbone: Backbone, images: torch.Tensor, semantic_layer: int) -> Reference:
    states = backbone.forward_all(images)
    return Reference(tokens=backbone.to_tokens(semantic_layer, states[semantic_layer]), pooled=backbone.pool(states[-1]))


def token_cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine along the feature axis, averaged over tokens: (B, N, W) x (B, N, W) -> (B,)."""
    return F.cosine_similarity(a.float(), b.float(), dim=-1).mean(dim=-1)


def pooled_cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return F.cosine_similarity(a.float(), b.float(), dim=-1)


@dataclass
class Classifier:
    """How pooled outputs become class scores: ``zeroshot`` (cosine to text embeddings) or ``head`` (logits)."""

    kind: str
    weights: torch.Tensor | None  # (C, E) for zero-shot
    num_classes: int
    description: dict

    def scores(self, pooled: torch.Tensor) -> torch.Tensor:
        if self.kind == "head":
            return pooled.float()  # (B, 1000) logits
        return F.normalize(pooled.float(), dim=-1) @ self.weights.to(pooled.device).T  # (B, C)

    def probabilities(self, pooled: torch.Tensor) -> torch.Tensor:
        """(B, C) class probabilities: softmax of the head's logits, or of 100 x the cosines (open_clip's scale)."""
        scale = 1.0 if self.kind == "head" else ZEROSHOT_LOGIT_SCALE
        return (self.scores(pooled) * scale).softmax(dim=-1)


def pretrained_folder(tokenizer) -> Path | None:
    """The model's ``config.backbone.pretrained`` SigLIP (the text tower): a local folder (relative paths taken from
    the model folder) or a Hub repo id, resolved as the teacher is (CheckpointError when it cannot be)."""
    backbone = tokenizer.config.backbone
    if not isinstance(getattr(backbone, "pretrained", None), str):
        return None
    return resolve_pretrained(backbone, getattr(tokenizer, "model_dir", None))


def default_cache_dir() -> Path:
    """Where zero-shot classifiers are kept: ``zeroshot`` under the package's cache folder (``$DUALTOKEN_CACHE``)."""
    return cache_root() / "zeroshot"


def build_classifier(tokenizer, config: EvalConfig, classes_path: Path | None) -> tuple[Classifier | None, str | None]:
    """The classifier for this model, or None and the reason why there is none."""
    backbone = tokenizer.backbone
    if tokenizer.config.backbone.kind != "siglip" and backbone.pooled_width == IMAGENET_CLASSES:
        return Classifier("head", None, IMAGENET_CLASSES, {"kind": "backbone classifier head (ImageNet-1k)"}), None
    try:
        folder = pretrained_folder(tokenizer)
    except CheckpointError as exc:
        return None, f"no zero-shot classifier: {exc}"
    if folder is None:
        return None, "no zero-shot classifier: the model's backbone.pretrained SigLIP folder is not set"
    if not folder.is_dir() or not has_tokenizer(folder):
        return None, f"no zero-shot classifier: {folder} is missing or holds no tokenizer files"
    if classes_path is None:
        return None, "no zero-shot classifier: no class-name file (pass classes=, e.g. imagenet_samples/classes.tsv)"
    names = read_class_names(classes_path)
    cache = Path(config.classifier_cache) if config.classifier_cache else default_cache_dir()
    try:
        weights, cache_file = cached_text_classifier(
            folder, names, OPENAI_IMAGENET_TEMPLATES, config.text_context_length, config.text_batch_size,
            config.text_clean, cache,
        )
    except (DualTokenError, OSError, ValueError) as exc:
        return None, f"no zero-shot classifier: the text tower in {folder} could not be used ({exc})"
    if weights.shape[1] != backbone.pooled_width:
        return None, (
            f"no zero-shot classifier: text embeddings have {weights.shape[1]} dims, the pooled image embedding "
            f"{backbone.pooled_width}"
        )
    description = {
        "kind": "SigLIP text-tower zero-shot",
        "text_tower": str(folder),
        "classes": str(classes_path),
        "num_classes": len(names),
        "templates": len(OPENAI_IMAGENET_TEMPLATES),
        "context_length": config.text_context_length,
        "clean": config.text_clean,
        "cache": str(cache_file),
    }
    return Classifier("zeroshot", weights, len(names), description), None
