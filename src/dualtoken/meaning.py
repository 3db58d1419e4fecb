"""What the semantic codes say: an image's top classes read from its quantized semantic path, next to those of the
same image through the unquantized pretrained tower, so one sees how much meaning the codes kept.

A model whose backbone head is an ImageNet-1k classifier (the shipped ``dualtoken-efflite0``) is read through its
logits; a SigLIP model with its text tower (``backbone.pretrained`` holding the tokenizer) through the zero-shot
classifier of the evaluation. Both name the 1000 ImageNet classes that ship in ``dualtoken/labels/imagenet.txt``.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch

from .backbones.base import Backbone
from .errors import DualTokenError
from .evaluation.config import EvalConfig
from .evaluation.semantic import Classifier, build_classifier, run_unquantized


def imagenet_classes_path() -> Path:
    """The packaged ImageNet-1k class names, one per line in class-index order."""
    return Path(str(resources.files("dualtoken") / "labels" / "imagenet.txt"))


def imagenet_class_names() -> list[str]:
    return imagenet_classes_path().read_text(encoding="utf-8").splitlines()


@dataclass
class ClassGuess:
    name: str
    probability: float


@dataclass
class Reading:
    """One image's top classes: from its semantic codes at every depth prefix k = 1..Q, and unquantized."""

    codes: list[list[ClassGuess]]  # index k - 1: from the first k semantic depths
    unquantized: list[ClassGuess]


class SemanticReader:
    """Top-``top`` classes of the quantized semantic path and of a reference tower run without quantization."""

    def __init__(
        self, tokenizer, classifier: Classifier, names: list[str], reference: Backbone, reference_name: str,
        top: int = 5,
    ) -> None:
        if classifier.num_classes != len(names):
            raise DualTokenError(f"the classifier has {classifier.num_classes} classes but {len(names)} names")
        self.tokenizer = tokenizer
        self.classifier = classifier
        self.names = names
        self.reference = reference
        self.reference_name = reference_name
        self.top = top

    def describe(self) -> dict[str, str]:
        return {"classifier": self.classifier.description["kind"], "reference": self.reference_name}

    def _top(self, pooled: torch.Tensor) -> list[list[ClassGuess]]:
        best = self.classifier.probabilities(pooled).topk(self.top, dim=-1)
        return [
            [ClassGuess(self.names[i], float(p)) for p, i in zip(values.tolist(), indices.tolist())]
            for values, indices in zip(best.values, best.indices)
        ]

    @torch.no_grad()
    def read(self, images: torch.Tensor, semantic_codes: torch.Tensor) -> list[Reading]:
        """Images (B, 3, H, W) in [-1, 1] and their semantic codes (B, h, w, Q) -> one Reading per image."""
        depth = semantic_codes.shape[-1]
        per_prefix = [self._top(self.tokenizer.pooled_embedding(semantic_codes[..., :k])) for k in range(1, depth + 1)]
        reference = run_unquantized(self.reference, images, self.tokenizer.config.semantic_layer)
        unquantized = self._top(reference.pooled)
        return [
            Reading([per_prefix[k][i] for k in range(depth)], unquantized[i]) for i in range(images.shape[0])
        ]


def build_reader(tokenizer, top: int = 5) -> tuple[SemanticReader | None, str | None]:
    """The reader for this model over the ImageNet classes, or None and the reason why there is none.

    The reference is the pretrained tower (the teacher) where it can be built, else the model's own tower; both run
    without quantization.
    """
    classifier, reason = build_classifier(tokenizer, EvalConfig(), imagenet_classes_path())
    if classifier is None:
        return None, reason
    try:
        reference = tokenizer.teacher().to(next(tokenizer.parameters()).device).eval()
        reference_name = "the pretrained tower, unquantized"
    except (DualTokenError, OSError):
        reference, reference_name = tokenizer.backbone, "this model's tower, unquantized"
    return SemanticReader(tokenizer, classifier, imagenet_class_names(), reference, reference_name, top), None
