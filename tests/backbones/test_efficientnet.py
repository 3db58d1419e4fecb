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


def test_at_resolution_keeps_weights_and_scales_the_grid():
    tok = DualTokenizer.from_config("dualtoken-efflite0-256").eval()
    small = tok.at_resolution(128)
    assert small.image_size == (128, 128) and small.grid == (8, 8)
    assert small.config.decoder.attn_resolutions == (8,) and small.config.decoder.resolution == 128
    assert all(torch.equal(a, b) for a, b in zip(tok.state_dict().values(), small.state_dict().values()))
    tokens = small.encode(torch.rand(1, 3, 128, 128) * 2 - 1)
    assert tokens.pixel.shape == (1, 8, 8, 4) and small.decode(tokens.pixel).shape == (1, 3, 128, 128)
    # a 128 px image is the same picture for either size: back at 256 the weights and the config round-trip
    back = small.at_resolution(256)
    assert back.config == tok.config


def test_at_resolution_rejects_sizes_off_the_grid_and_siglip():
    from dualtoken.errors import ConfigError

    with pytest.raises(ConfigError, match="multiple of 16"):
        get_config("dualtoken-efflite0-256").at_resolution(200)
    with pytest.raises(ConfigError, match="trained resolution"):
        get_config("dualtoken-tiny").at_resolution(64)
