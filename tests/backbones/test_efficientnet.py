import csv

import pytest
import torch

from dualtoken import DualTokenizer, get_config
from dualtoken.backbones import EfficientNetBackbone
from dualtoken.io import load_image


@pytest.fixture(scope="module")
def backbone():
    return EfficientNetBackbone.teacher(get_config("dualtoken-efflite0-256").backbone)


def test_taps_share_one_grid(backbone):
    assert backbone.grid == (16, 16) and backbone.pooled_width == 1000
    states = backbone.forward_all(torch.zeros(1, 3, 256, 256))
    for layer in (5, 11):  # the pixel and semantic taps of dualtoken-efflite0-256
        tokens = backbone.to_tokens(layer, states[layer])
        assert tokens.shape == (1, 256, backbone.tap_width(layer))
        assert torch.equal(backbone.from_tokens(layer, tokens), states[layer])
    assert backbone.tap_width(5) == 40 * 4 and backbone.tap_width(11) == 112


def test_batch_norm_stays_frozen_in_training(backbone):
    tok = DualTokenizer.from_config("dualtoken-efflite0-256").train()
    norms = [m for m in tok.backbone.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert norms and not any(m.training for m in norms)
    before = norms[0].running_mean.clone()
    out = tok(torch.rand(2, 3, 256, 256) * 2 - 1)
    assert torch.equal(before, norms[0].running_mean)
    assert out.pooled.shape == (2, 1000) and out.reconstruction.shape == (2, 3, 256, 256)
    (out.reconstruction.mean() + out.pooled.mean() + out.pixel_commitment).backward()
    assert tok.backbone.network._blocks[0]._depthwise_conv.weight.grad is not None


@pytest.mark.data
def test_teacher_classifies_held_out_images(backbone, shared_data):
    rows = list(csv.DictReader(open(shared_data / "imagenet_samples" / "labels.tsv"), delimiter="\t"))
    rows = [r for r in rows if int(r["class_index"]) % 2 == 1][:24]
    images = torch.stack([load_image(shared_data / "imagenet_samples" / r["file"], (256, 256)) for r in rows])
    with torch.no_grad():
        logits = backbone.pool(backbone.forward_all(images)[-1])
    labels = torch.tensor([int(r["class_index"]) for r in rows])
    assert (logits.argmax(1) == labels).float().mean() > 0.7  # real ImageNet weights (random would be ~0)
