"""A naive pair of tokenizers: the pixel vocabulary of one model, the semantic vocabulary of another.

DualToken's claim is that one tokenizer with two vocabularies beats two tokenizers trained apart (the paper's
MoVQGAN + VQ-SigLIP dual-encoder baseline). :class:`TokenizerPair` is that baseline in this library's terms: two
trained :class:`~dualtoken.DualTokenizer` folders, each with its own tower and its own codebook training; the pair
reads the ``pixel`` codes (and decodes them) with the first and the ``semantic`` codes with the second, so anything
that takes a tokenizer (``encode_dataset``, the MLLM) takes a pair. Encoding runs both towers: twice the cost.

A single-vocabulary model (no ``pixel_quantizer``: its one codebook serves both names) can be either member, e.g.
a reconstruction-only tokenizer for the pixel side and a semantic-only one for the semantic side. A pair is saved
as a folder with ``pair.json`` and the two tokenizers in ``pixel/`` and ``semantic/``; :func:`load_visual_tokenizer`
opens a pair folder or anything :meth:`DualTokenizer.from_pretrained` opens.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .checkpoint import save_pretrained as save_tokenizer
from .config import from_dict, read_json
from .errors import CheckpointError, ConfigError
from .tokenizer import BRANCHES, DualTokenizer, DualTokens

PAIR_CONFIG_NAME = "pair.json"


@dataclass
class TokenizerPairConfig:
    """What ``pair.json`` holds: the pair's name and the names of the two tokenizers it was made of."""

    name: str
    pixel: str  # the model that gives the pixel vocabulary (and decodes it)
    semantic: str  # the model that gives the semantic vocabulary


class TokenizerPair(nn.Module):
    """Two tokenizers behind one tokenizer's interface (the part the data pipeline and the MLLM use)."""

    def __init__(self, pixel_source: DualTokenizer, semantic_source: DualTokenizer, name: str | None = None) -> None:
        super().__init__()
        for what, size in (("image size", "image_size"), ("position grid", "grid")):
            if getattr(pixel_source, size) != getattr(semantic_source, size):
                raise ConfigError(
                    f"a tokenizer pair needs one {what}: the pixel model {pixel_source.config.name} has "
                    f"{getattr(pixel_source, size)}, the semantic model {semantic_source.config.name} "
                    f"{getattr(semantic_source, size)}"
                )
        self.pixel_source, self.semantic_source = pixel_source, semantic_source
        self.config = TokenizerPairConfig(
            name or f"pair-{pixel_source.config.name}-{semantic_source.config.name}",
            pixel_source.config.name,
            semantic_source.config.name,
        )
        self.name_or_path: str | None = None

    def source(self, branch: str) -> DualTokenizer:
        """The tokenizer that gives vocabulary ``branch``."""
        if branch not in BRANCHES:
            raise ConfigError(f"unknown branch {branch!r}; expected 'pixel' or 'semantic'")
        return self.pixel_source if branch == "pixel" else self.semantic_source

    # the tokenizer interface ---------------------------------------------------------------------------------------

    @property
    def image_size(self) -> tuple[int, int]:
        return self.pixel_source.image_size

    @property
    def grid(self) -> tuple[int, int]:
        return self.pixel_source.grid

    @property
    def pixel_depth(self) -> int:
        return self.pixel_source.pixel_depth

    @property
    def semantic_depth(self) -> int:
        return self.semantic_source.semantic_depth

    def codebook_size(self, branch: str) -> int:
        return self.source(branch).codebook_size(branch)

    def codebook(self, branch: str) -> torch.Tensor:
        return self.source(branch).codebook(branch)

    def check_codes(self, codes: torch.Tensor, branch: str) -> None:
        self.source(branch).check_codes(codes, branch)

    def code_embeddings(self, codes: torch.Tensor, branch: str, per_depth: bool = True) -> torch.Tensor:
        return self.source(branch).code_embeddings(codes, branch, per_depth)

    @torch.no_grad()
    def encode(self, images: torch.Tensor, precision: str | None = None) -> DualTokens:
        """Images (B, 3, H, W) in [-1, 1] -> the pixel model's pixel codes and the semantic model's semantic codes
        (both towers run)."""
        pixel = self.pixel_source.encode(images, precision).pixel  # (B, h, w, Qp)
        return DualTokens(pixel, self.semantic_source.encode(images, precision).semantic)

    def decode(self, pixel_codes: torch.Tensor, precision: str | None = None) -> torch.Tensor:
        return self.pixel_source.decode(pixel_codes, precision)

    def at_resolution(self, image_size: int) -> TokenizerPair:
        """Both members at ``image_size`` (convolutional backbones only), under the same name."""
        resized = TokenizerPair(
            self.pixel_source.at_resolution(image_size), self.semantic_source.at_resolution(image_size)
        )
        resized.config = self.config
        return resized

    # folders -------------------------------------------------------------------------------------------------------

    def save_pretrained(self, path: str | Path) -> Path:
        """``pair.json`` and the two tokenizers (``pixel/``, ``semantic/``) in folder ``path``."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        for branch in BRANCHES:
            save_tokenizer(self.source(branch), path / branch, name=getattr(self.config, branch))
        (path / PAIR_CONFIG_NAME).write_text(json.dumps(dataclasses.asdict(self.config), indent=2) + "\n")
        return path

    @classmethod
    def from_pretrained(cls, path: str | Path) -> TokenizerPair:
        """Load a folder written by :meth:`save_pretrained`, in eval mode."""
        path = Path(path)
        config = from_dict(TokenizerPairConfig, read_json(path / PAIR_CONFIG_NAME, "tokenizer pair config"))
        missing = [b for b in BRANCHES if not (path / b).is_dir()]
        if missing:
            raise CheckpointError(f"{path} is a tokenizer pair without its {' and '.join(missing)} tokenizer folder")
        pair = cls(*(DualTokenizer.from_pretrained(path / b) for b in BRANCHES), name=config.name)
        pair.name_or_path = str(path.resolve())
        return pair.eval()

    @classmethod
    def from_parts(cls, pixel: str | Path, semantic: str | Path, name: str | None = None) -> TokenizerPair:
        """A pair of two trained models (names or folders, as :meth:`DualTokenizer.from_pretrained` takes)."""
        return cls(DualTokenizer.from_pretrained(pixel), DualTokenizer.from_pretrained(semantic), name).eval()


def is_tokenizer_pair(name_or_path: str | Path) -> bool:
    return (Path(name_or_path) / PAIR_CONFIG_NAME).is_file()


def load_visual_tokenizer(name_or_path: str | Path) -> DualTokenizer | TokenizerPair:
    """A tokenizer pair folder (``pair.json``) or anything :meth:`DualTokenizer.from_pretrained` opens."""
    if is_tokenizer_pair(name_or_path):
        return TokenizerPair.from_pretrained(name_or_path)
    return DualTokenizer.from_pretrained(name_or_path)
