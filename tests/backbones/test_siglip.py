import dataclasses

import pytest
import torch
from transformers import SiglipVisionConfig, SiglipVisionModel

from dualtoken import CheckpointError, DualTokenizer, get_config


def save_tower(folder, **overrides):
    cfg = get_config("dualtoken-tiny").backbone
    numbers = dict(hidden_size=cfg.width, intermediate_size=cfg.mlp_width, num_hidden_layers=cfg.num_layers,
                   num_attention_heads=cfg.num_heads, image_size=cfg.image_size, patch_size=cfg.patch_size)
    numbers.update(overrides)
    torch.manual_seed(7)
    model = SiglipVisionModel(SiglipVisionConfig(**numbers))
    model.save_pretrained(folder)
    return model


def test_from_config_loads_the_tower_from_a_local_folder(tmp_path):
    tower = save_tower(tmp_path / "siglip")
    tok = DualTokenizer.from_config("dualtoken-tiny", backbone_path=tmp_path / "siglip")
    ours = tok.backbone.vision_model.state_dict()
    for key, value in tower.vision_model.state_dict().items():
        assert torch.equal(ours[key], value), key
    teacher = tok.teacher()
    assert not any(p.requires_grad for p in teacher.parameters())
    images = torch.rand(1, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        expected = tower(pixel_values=images).pooler_output
        assert torch.allclose(teacher.pool(teacher.forward_all(images)[-1]), expected, atol=1e-5)


def test_a_tower_of_another_size_is_refused(tmp_path):
    save_tower(tmp_path / "siglip", hidden_size=96, intermediate_size=64)
    with pytest.raises(CheckpointError, match="does not match"):
        DualTokenizer.from_config("dualtoken-tiny", backbone_path=tmp_path / "siglip")
    with pytest.raises(CheckpointError, match="not a SigLIP folder"):
        DualTokenizer.from_config("dualtoken-tiny", backbone_path=tmp_path / "nothing")


def test_gradient_checkpointing_gives_the_same_gradients(tiny_images):
    torch.manual_seed(0)
    tok = DualTokenizer.from_config(dataclasses.replace(get_config("dualtoken-tiny"))).train()
    for branch in ("pixel", "semantic"):  # codebooks fixed, so both passes pick the same codes
        tok.quantizer(branch).eval()
    grads = []
    for enabled in (False, True):
        tok.zero_grad()
        tok.backbone.set_gradient_checkpointing(enabled)
        torch.manual_seed(1)
        tok(tiny_images).pooled.square().mean().backward()
        grads.append(tok.backbone.vision_model.embeddings.patch_embedding.weight.grad.clone())
    torch.testing.assert_close(grads[0], grads[1])
