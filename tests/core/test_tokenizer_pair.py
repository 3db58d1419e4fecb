"""A naive pair of tokenizers behind one tokenizer's interface (dualtoken.tokenizer_pair)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from dualtoken import DualTokenizer, TokenizerPair, load_visual_tokenizer
from dualtoken.config import apply_overrides
from dualtoken.errors import CheckpointError, ConfigError
from dualtoken.registry import get_config


def single_vocabulary(seed: int, depth: int, codes: int) -> DualTokenizer:
    """A random tiny model with one codebook (no pixel quantizer), as the pair's members are."""
    torch.manual_seed(seed)
    config = apply_overrides(
        get_config("dualtoken-tiny"),
        ["pixel_quantizer=null", "shortcut_layer=null", f"semantic_quantizer.depth={depth}", f"semantic_quantizer.codebook_size={codes}"],
    )
    return DualTokenizer.from_config(config).eval()


@pytest.fixture
def members() -> tuple[DualTokenizer, DualTokenizer]:
    return single_vocabulary(0, 3, 64), single_vocabulary(1, 5, 128)


def test_a_pair_reads_each_vocabulary_from_its_own_model(members, tiny_images):
    pixel_model, semantic_model = members
    pair = TokenizerPair(pixel_model, semantic_model)
    codes = pair.encode(tiny_images)
    assert codes.pixel.equal(pixel_model.encode(tiny_images).pixel)  # (B, h, w, 3) from the first tower
    assert codes.semantic.equal(semantic_model.encode(tiny_images).semantic)  # (B, h, w, 5) from the second
    assert (pair.pixel_depth, pair.semantic_depth) == (3, 5)
    assert (pair.codebook_size("pixel"), pair.codebook_size("semantic")) == (64, 128)
    assert pair.codebook("semantic").equal(semantic_model.codebook("semantic"))
    assert pair.decode(codes.pixel).equal(pixel_model.decode(codes.pixel))
    torch.testing.assert_close(
        pair.code_embeddings(codes.semantic, "semantic", per_depth=False),
        semantic_model.code_embeddings(codes.semantic, "semantic", per_depth=False),
    )
    with pytest.raises(Exception, match="codes"):  # codes of the other vocabulary's shape are refused
        pair.check_codes(codes.semantic, "pixel")


def test_a_pair_folder_round_trips_and_loads_by_path(members, tiny_images, tmp_path):
    pair = TokenizerPair(*members, name="my-pair")
    pair.save_pretrained(tmp_path / "pair")
    assert json.loads((tmp_path / "pair" / "pair.json").read_text())["name"] == "my-pair"
    loaded = load_visual_tokenizer(tmp_path / "pair")
    assert isinstance(loaded, TokenizerPair) and loaded.config.name == "my-pair"
    again = loaded.encode(tiny_images)
    assert again.pixel.equal(pair.encode(tiny_images).pixel) and again.semantic.equal(pair.encode(tiny_images).semantic)
    assert isinstance(load_visual_tokenizer(tmp_path / "pair" / "pixel"), DualTokenizer)  # a plain model folder
    shutil.rmtree(tmp_path / "pair" / "semantic")
    with pytest.raises(CheckpointError, match="without its semantic tokenizer folder"):
        TokenizerPair.from_pretrained(tmp_path / "pair")
    (tmp_path / "pair" / "pair.json").write_text(json.dumps({"name": "x", "pixel": "a", "semantic": "b", "extra": 1}))
    with pytest.raises(ConfigError, match="unknown key"):
        TokenizerPair.from_pretrained(tmp_path / "pair")


def test_a_pair_of_different_image_sizes_is_refused(members):
    bigger = DualTokenizer.from_config(
        apply_overrides(get_config("dualtoken-tiny"), ["backbone.image_size=128", "decoder.resolution=128"])
    )
    with pytest.raises(ConfigError, match="one image size"):
        TokenizerPair(members[0], bigger)
    with pytest.raises(ConfigError, match="unknown branch"):
        TokenizerPair(*members).source("depth")
