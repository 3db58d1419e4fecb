"""Fixtures of the evaluation tests: small image folders, a tiny SigLIP with a text tower and a tokenizer, and a
tokenizer whose pixel vocabulary is an exact residual quantizer (so deeper codes provably reduce the error)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from dualtoken import DualTokenizer, DualTokens, get_config
from dualtoken.io import save_image


def write_images(folder: Path, count: int, size: int = 64, seed: int = 0) -> list[Path]:
    """``count`` smooth random RGB PNGs (size x size) in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(seed)
    low = torch.rand(count, 3, 6, 6, generator=generator) * 2 - 1
    images = F.interpolate(low, size=(size, size), mode="bicubic", align_corners=False).clamp(-1, 1)
    return [save_image(image, folder / f"img{i:02d}.png") for i, image in enumerate(images)]


@pytest.fixture
def image_folder(tmp_path) -> Path:
    """Five 64x64 PNGs (an odd count: two processes get unequal shares)."""
    folder = tmp_path / "images"
    write_images(folder, 5)
    return folder


CLASS_NAMES = ("red fox", "tabby cat", "garden snail")


def _word_level_tokenizer(folder: Path, words: set[str]) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[PAD]": 0, "[UNK]": 1, **{w: i + 2 for i, w in enumerate(sorted(words))}}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=core, pad_token="[PAD]", unk_token="[UNK]").save_pretrained(folder)


def save_tiny_siglip(folder: Path, seed: int):
    """Save a random SiglipModel (vision = the dualtoken-tiny tower, text tower projecting to the same width) with a
    word-level tokenizer of the zero-shot prompts into ``folder`` (save_pretrained format); returns the model."""
    from transformers import SiglipConfig, SiglipModel

    from dualtoken.evaluation.templates import OPENAI_IMAGENET_TEMPLATES
    from dualtoken.evaluation.zeroshot import canonicalize

    vision = get_config("dualtoken-tiny").backbone
    config = SiglipConfig(
        text_config={"vocab_size": 256, "hidden_size": vision.width, "intermediate_size": 64, "num_hidden_layers": 1,
                     "num_attention_heads": 2, "max_position_embeddings": 16},
        vision_config={"hidden_size": vision.width, "intermediate_size": vision.mlp_width, "image_size":
                       vision.image_size, "patch_size": vision.patch_size, "num_hidden_layers": vision.num_layers,
                       "num_attention_heads": vision.num_heads},
    )
    torch.manual_seed(seed)
    model = SiglipModel(config)
    model.save_pretrained(folder)
    words = {w for t in OPENAI_IMAGENET_TEMPLATES for name in CLASS_NAMES for w in canonicalize(t.format(name)).split()}
    _word_level_tokenizer(folder, words)
    return model


@pytest.fixture(scope="session")
def tiny_siglip_dir(tmp_path_factory) -> Path:
    """A tiny random SigLIP in save_pretrained format (:func:`save_tiny_siglip`): a model's ``backbone.pretrained``
    folder."""
    folder = tmp_path_factory.mktemp("siglip")
    save_tiny_siglip(folder, seed=3)
    return folder


@pytest.fixture
def labelled_folder(tmp_path) -> Path:
    """A folder with images/, labels.tsv (file, class_index) and classes.tsv (index, wnid, name)."""
    root = tmp_path / "labelled"
    paths = write_images(root / "images", 4, seed=1)
    labels = ["file\tclass_index"] + [f"images/{p.name}\t{i % len(CLASS_NAMES)}" for i, p in enumerate(paths)]
    (root / "labels.tsv").write_text("\n".join(labels) + "\n")
    classes = ["index\twnid\tname"] + [f"{i}\tn{i:08d}\t{name}" for i, name in enumerate(CLASS_NAMES)]
    (root / "classes.tsv").write_text("\n".join(classes) + "\n")
    return root


class ResidualPatchTokenizer(DualTokenizer):
    """``dualtoken-tiny`` whose pixel vocabulary is an exact residual quantizer of each patch's mean colour.

    Depth q quantizes every channel of what depths 1..q-1 left on a grid of ``LEVELS`` steps that shrinks by
    ``LEVELS`` each depth, so every deeper code can only reduce the error of the patch means; the image error is
    the within-patch variation plus that, so PSNR rises with k by construction. Semantic codes are the real ones.
    """

    LEVELS = 6  # 6**3 = 216 codes <= K = 256

    def _pixel_codes(self, images: torch.Tensor) -> torch.Tensor:
        h, w = self.grid
        residual = F.adaptive_avg_pool2d(images.float(), (h, w)).permute(0, 2, 3, 1)  # (B, h, w, 3) in [-1, 1]
        half_range, codes = 1.0, []
        for _ in range(self.pixel_depth):
            step = 2 * half_range / self.LEVELS
            level = ((residual + half_range) / step).floor().clamp(0, self.LEVELS - 1)  # (B, h, w, 3)
            residual = residual - (-half_range + (level + 0.5) * step)
            codes.append((level[..., 0] * self.LEVELS + level[..., 1]) * self.LEVELS + level[..., 2])
            half_range = step / 2
        return torch.stack(codes, dim=-1).long()  # (B, h, w, Q)

    def encode(self, images: torch.Tensor) -> DualTokens:
        return DualTokens(self._pixel_codes(images), super().encode(images).semantic)

    def decode(self, pixel_codes: torch.Tensor) -> torch.Tensor:
        half_range, means = 1.0, 0.0
        for q in range(pixel_codes.shape[-1]):
            code = pixel_codes[..., q]
            level = torch.stack([code // self.LEVELS**2, code // self.LEVELS % self.LEVELS, code % self.LEVELS], -1)
            step = 2 * half_range / self.LEVELS
            means = means + (-half_range + (level.float() + 0.5) * step)
            half_range = step / 2
        return F.interpolate(means.permute(0, 3, 1, 2), size=self.image_size, mode="nearest")  # (B, 3, H, W)


@pytest.fixture
def residual_tokenizer() -> ResidualPatchTokenizer:
    torch.manual_seed(0)
    return ResidualPatchTokenizer.from_config("dualtoken-tiny").eval()
