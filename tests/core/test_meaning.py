"""What the semantic codes say: the shipped model's codes read as ImageNet classes, beside the unquantized tower."""

from __future__ import annotations

import pytest
import torch
from skimage import data

from dualtoken import DualTokenizer
from dualtoken.meaning import build_reader, imagenet_class_names


@pytest.fixture(scope="module")
def efflite0():
    return DualTokenizer.from_pretrained("dualtoken-efflite0")


def test_the_imagenet_names_ship_in_index_order():
    names = imagenet_class_names()
    assert len(names) == 1000
    assert names[0] == "tench" and names[1] == "goldfish" and names[999] == "toilet tissue"
    assert all(name and name == name.strip() for name in names)


def test_the_shipped_model_reads_its_codes_through_its_head(efflite0):
    reader, reason = build_reader(efflite0)
    assert reason is None
    assert reader.describe() == {
        "classifier": "backbone classifier head (ImageNet-1k)",
        "reference": "the pretrained tower, unquantized",
    }
    pixels = torch.from_numpy(data.chelsea()).permute(2, 0, 1).float() / 127.5 - 1  # a tabby cat
    images = torch.nn.functional.interpolate(pixels[None], size=efflite0.image_size, mode="bilinear")
    (reading,) = reader.read(images, efflite0.encode(images).semantic)
    assert len(reading.codes) == efflite0.semantic_depth  # one reading per depth prefix k
    for guesses in [*reading.codes, reading.unquantized]:
        probabilities = [g.probability for g in guesses]
        assert len(guesses) == 5 and probabilities == sorted(probabilities, reverse=True)
        assert 0 < sum(probabilities) <= 1 + 1e-6
    cats = {"tabby", "tiger cat", "Egyptian cat"}
    assert reading.unquantized[0].name in cats and reading.codes[-1][0].name in cats
    assert reading.codes[0] != reading.codes[-1]  # more depths, another reading


def test_a_model_without_classifier_says_why(tiny_tokenizer):
    reader, reason = build_reader(tiny_tokenizer)
    assert reader is None and reason.startswith("no zero-shot classifier")
