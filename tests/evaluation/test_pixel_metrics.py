"""PSNR and SSIM (dualtoken.metrics, what the evaluation uses) and the feature-level distance against values
known in closed form."""

import math

import pytest
import torch

from dualtoken.evaluation.feature_net import level_distance
from dualtoken.evaluation.protocol import to_uint8, to_uint8_levels
from dualtoken.metrics import psnr as psnr_per_image
from dualtoken.metrics import ssim as ssim_per_image


def _unit_images(seed: int = 0) -> torch.Tensor:
    """Images in [0.2, 0.8] on the [0, 1] scale (room for noise without clamping)."""
    return 0.2 + 0.6 * torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("delta", [1 / 255, 0.01, 0.05])
def test_psnr_of_a_known_error_level(delta):
    clean = _unit_images()
    signs = torch.randint(0, 2, clean.shape, generator=torch.Generator().manual_seed(1)) * 2 - 1
    noisy = clean + delta * signs  # every pixel off by exactly delta: MSE = delta^2
    psnr = psnr_per_image(noisy * 2 - 1, clean * 2 - 1)  # on the model's [-1, 1] scale
    assert psnr.shape == (3,)
    torch.testing.assert_close(psnr, torch.full((3,), -20 * math.log10(delta)), atol=1e-3, rtol=0)


def test_psnr_of_gaussian_noise_matches_its_sigma():
    clean = 0.5 + 0.0 * _unit_images()
    sigma = 0.02
    noisy = clean + sigma * torch.randn(clean.shape, generator=torch.Generator().manual_seed(2))
    psnr = psnr_per_image(noisy * 2 - 1, clean * 2 - 1)
    assert torch.all((psnr - (-20 * math.log10(sigma))).abs() < 0.15)


def test_psnr_clamps_reconstructions_that_overshoot():
    target = torch.ones(1, 3, 16, 16)  # white
    overshoot = torch.full((1, 3, 16, 16), 1.7)  # an unclamped decoder output above white
    assert math.isinf(float(psnr_per_image(overshoot, target)[0]))


def test_ssim_of_identical_images_is_one_and_falls_with_noise():
    clean = _unit_images() * 2 - 1
    assert torch.allclose(ssim_per_image(clean, clean), torch.ones(3), atol=1e-5)
    values = [float(ssim_per_image(clean + s * torch.randn_like(clean), clean).mean()) for s in (0.02, 0.1, 0.3)]
    assert values[0] > values[1] > values[2]


def test_level_distance_is_zero_on_itself_and_symmetric():
    generator = torch.Generator().manual_seed(0)
    a = [torch.randn(2, c, s, s, generator=generator) for c, s in ((8, 16), (16, 8))]
    b = [x + 0.5 * torch.randn(x.shape, generator=generator) for x in a]
    assert torch.allclose(level_distance(a, a), torch.zeros(2))
    assert torch.all(level_distance(a, b) > 0)
    torch.testing.assert_close(level_distance(a, b), level_distance(b, a))


def test_8bit_levels_round_never_truncate():
    value = torch.full((1, 3, 2, 2), (200.6 / 255) * 2 - 1)
    assert int(to_uint8(value)[0, 0, 0, 0]) == 201
    assert torch.allclose(to_uint8_levels(value), torch.full_like(value, 201 / 127.5 - 1))
