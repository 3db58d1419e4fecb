"""The objective's pure functions and their weighted sum."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from dualtoken.errors import ConfigError
from dualtoken.losses import (
    DualTokenObjective,
    GanConfig,
    LossConfig,
    TeacherTargets,
    adaptive_gan_weight,
    discriminator_hinge_loss,
    generator_adversarial_loss,
    mean_cosine,
    reencoding_loss,
    teacher_targets,
)


def test_hinge_is_leaky_and_zero_when_confident():
    confident = discriminator_hinge_loss(torch.full((2, 1, 4, 4), 3.0), torch.full((2, 1, 4, 4), -3.0), 0.01)
    assert float(confident) == pytest.approx(0.5 * (0.01 * -2 + 0.01 * -2))
    fooled = discriminator_hinge_loss(torch.zeros(1, 1, 2, 2), torch.zeros(1, 1, 2, 2), 0.01)
    assert float(fooled) == pytest.approx(1.0)
    assert float(generator_adversarial_loss(torch.tensor([1.0, 3.0]))) == -2.0


def test_cosine_is_along_features_and_averaged():
    a = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])  # (1, 2 tokens, 2)
    b = torch.tensor([[[2.0, 0.0], [1.0, 0.0]]])
    assert float(mean_cosine(a, b)) == pytest.approx(0.5)


def test_adaptive_weight_is_gradient_norm_ratio_clamped():
    weight = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
    rec = (weight * torch.tensor([3.0, 4.0])).sum()  # gradient norm 5
    adv = (weight * torch.tensor([0.0, 2.0])).sum()  # gradient norm 2
    assert float(adaptive_gan_weight(rec, adv, weight, 0.3, 10.0, 0.0)) == pytest.approx(2.5)
    assert float(adaptive_gan_weight(rec, adv * 100, weight, 0.3, 10.0, 0.0)) == pytest.approx(0.3)
    assert float(adaptive_gan_weight(rec, adv / 100, weight, 0.3, 10.0, 0.0)) == pytest.approx(10.0)


def _fake_output(batch: int = 2, generator: torch.Generator | None = None):
    g = generator or torch.Generator().manual_seed(0)
    fields = {
        "semantic_features": torch.randn(batch, 16, 8, generator=g, requires_grad=True),
        "pooled": torch.randn(batch, 8, generator=g, requires_grad=True),
        "reconstruction": torch.randn(batch, 3, 16, 16, generator=g, requires_grad=True),
        "pixel_latent": torch.randn(batch, 16, 4, generator=g, requires_grad=True),
        "pixel_commitment": torch.tensor(0.2),
        "semantic_commitment": torch.tensor(0.3),
    }
    return type("Out", (), fields)()


def teacher_targets_stub(out):
    g = torch.Generator().manual_seed(1)
    tokens = torch.randn(out.semantic_features.shape, generator=g)
    return TeacherTargets(tokens=tokens, pooled=torch.randn(out.pooled.shape, generator=g))


def test_total_is_the_weighted_sum_of_the_logged_terms():
    config = LossConfig(perceptual=0.0, perceptual_kind="none", pixel_l1=2.0, semantic_weight=0.5)
    objective = DualTokenObjective(config)
    out = _fake_output()
    images = torch.rand(2, 3, 16, 16) * 2 - 1
    targets = teacher_targets_stub(out)
    total, terms = objective.generator(out, images, targets)
    expected = (
        0.5
        * (5 * terms["token_mse"] - 5 * terms["token_cosine"] + terms["pooled_mse"] - terms["pooled_cosine"])
        + 5 * 0.2
        + 5 * 0.3
        + 5 * terms["pixel_mse"]
        + 2 * terms["pixel_l1"]
    )
    assert float(total.detach()) == pytest.approx(float(expected), rel=1e-6)
    assert float(terms["pixel_mse"]) == pytest.approx(float(F.mse_loss(out.reconstruction.detach(), images)))
    total.backward()
    assert out.reconstruction.grad is not None and out.semantic_features.grad is not None


def test_zero_weights_skip_terms_and_stage2_weights():
    stage2 = LossConfig(
        token_mse=0.0,
        token_cosine=1.0,
        pooled_mse=5.0,
        pooled_cosine=5.0,
        pixel_commitment=0.0,
        pixel_mse=0.0,
        perceptual=0.0,
        perceptual_kind="none",
    )
    out = _fake_output()
    total, terms = DualTokenObjective(stage2).generator(
        out, torch.zeros(2, 3, 16, 16), teacher_targets_stub(out)
    )
    assert "token_mse" not in terms and "pixel_l1" not in terms
    expected = -terms["token_cosine"] + 5 * (terms["pooled_mse"] - terms["pooled_cosine"]) + 5 * 0.3
    assert float(total.detach()) == pytest.approx(float(expected), rel=1e-6)


def test_gan_term_uses_adaptive_weight_on_last_layer():
    conv = torch.nn.Conv2d(3, 3, 3, padding=1)
    images = torch.rand(2, 3, 16, 16) * 2 - 1
    out = _fake_output()
    out.reconstruction = conv(out.reconstruction.detach())
    disc = torch.nn.Conv2d(3, 1, 3)
    config = LossConfig(perceptual=0.0, perceptual_kind="none", semantic_weight=0.0)
    total, terms = DualTokenObjective(config).generator(
        out, images, discriminator=disc, last_layer=conv.weight
    )
    assert 0.3 <= float(terms["gan_weight"]) <= 10.0
    no_gan, _ = DualTokenObjective(config).generator(out, images)
    gan_part = float(terms["gan_weight"]) * 0.75 * float(terms["gan_generator"])
    assert float(total.detach()) == pytest.approx(float(no_gan.detach()) + gan_part, rel=1e-5)


def _reencoder(images: torch.Tensor) -> torch.Tensor:
    """A stand-in for tower + projection: 4x4 patches of the clamped image, 4 channels each -> (B, 16, 4)."""
    patches = F.avg_pool2d(images, 4).flatten(2).transpose(1, 2)  # (B, 16, 3)
    return torch.cat([patches, patches.sum(-1, keepdim=True)], dim=-1)


def test_the_reencoding_term_trains_the_way_back_and_is_blind_to_the_latent_scale():
    config = LossConfig(perceptual=0.0, perceptual_kind="none", semantic_weight=0.0, reencode=2.0)
    out = _fake_output()
    images = torch.rand(2, 3, 16, 16) * 2 - 1
    total, terms = DualTokenObjective(config).generator(out, images, reencoder=_reencoder)
    latent = out.pixel_latent.detach()
    again = _reencoder(out.reconstruction.detach().clamp(-1, 1))
    assert float(terms["reencode"]) == pytest.approx(float(F.mse_loss(again, latent) / latent.var()), rel=1e-5)
    without, _ = DualTokenObjective(dataclasses.replace(config, reencode=0.0)).generator(out, images)
    assert float(total.detach()) == pytest.approx(float(without.detach()) + 2 * float(terms["reencode"]), rel=1e-5)
    total.backward()
    assert out.reconstruction.grad.abs().sum() > 0 and out.pixel_latent.grad is None  # the original is the target
    assert float(reencoding_loss(10 * again, 10 * latent)) == pytest.approx(float(reencoding_loss(again, latent)))
    assert float(reencoding_loss(latent, latent)) == 0.0
    with pytest.raises(ConfigError, match="re-encoder"):
        DualTokenObjective(config).generator(_fake_output(), images)
    with pytest.raises(ConfigError, match="loss.reencode"):
        LossConfig(reencode=-1.0)


def test_discriminator_loss_scale_follows_the_schedule():
    gan = GanConfig(start_step=10, disc_unscaled_steps=5, disc_loss_weight=0.75)
    objective = DualTokenObjective(LossConfig(perceptual=0.0, perceptual_kind="none", gan=gan))
    real, fake = torch.zeros(1, 1, 2, 2), torch.zeros(1, 1, 2, 2)
    assert float(objective.discriminator(real, fake, 12)[0]) == pytest.approx(1.0)
    assert float(objective.discriminator(real, fake, 15)[0]) == pytest.approx(0.75)
    assert not gan.active(9) and gan.active(10)


def test_bad_loss_configs_are_rejected():
    with pytest.raises(ConfigError):
        LossConfig(perceptual=1.0, perceptual_kind="none")
    with pytest.raises(ConfigError):
        GanConfig(adaptive_min=2.0, adaptive_max=1.0)
    with pytest.raises(ConfigError, match="teacher"):
        DualTokenObjective(
            dataclasses.replace(LossConfig(), perceptual=0.0, perceptual_kind="none")
        ).generator(_fake_output(), torch.zeros(2, 3, 16, 16))


def test_teacher_targets_are_the_semantic_layer_and_pool(tiny_tokenizer, tiny_images):
    backbone = tiny_tokenizer.backbone
    layer = tiny_tokenizer.config.semantic_layer
    targets = teacher_targets(backbone, tiny_images, layer)
    states = backbone.forward_all(tiny_images)
    torch.testing.assert_close(targets.tokens, backbone.to_tokens(layer, states[layer]))
    torch.testing.assert_close(targets.pooled, backbone.pool(states[-1]))
    assert not targets.tokens.requires_grad
