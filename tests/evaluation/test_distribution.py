"""Fréchet distance and KID: closed-form cases, and real photos degraded by JPEG (../shared/data/kodak)."""

import io

import pytest
import torch
from PIL import Image

from dualtoken.evaluation.distribution import frechet_distance, kernel_distance
from dualtoken.evaluation.feature_net import FeatureNet
from dualtoken.io import load_image


def test_frechet_distance_of_a_set_with_itself_is_zero():
    features = torch.randn(64, 16, generator=torch.Generator().manual_seed(0)).double()
    assert abs(frechet_distance(features, features)) < 1e-6


def test_frechet_distance_of_a_shifted_set_is_the_squared_shift():
    features = torch.randn(128, 8, generator=torch.Generator().manual_seed(1)).double()
    shift = torch.tensor([0.5, -1.0, 0, 0, 0, 0, 2.0, 0]).double()
    # same covariance, means apart by `shift`: FD = |shift|^2
    assert abs(frechet_distance(features, features + shift) - float(shift.pow(2).sum())) < 1e-6


def test_kid_is_seeded_and_near_zero_on_one_distribution():
    generator = torch.Generator().manual_seed(2)
    a, b = torch.randn(200, 8, generator=generator), torch.randn(200, 8, generator=generator)
    same = kernel_distance(a, b, subsets=20, subset_size=50, degree=3, seed=0)
    assert same == kernel_distance(a, b, subsets=20, subset_size=50, degree=3, seed=0)
    far = kernel_distance(a, b + 1.0, subsets=20, subset_size=50, degree=3, seed=0)
    assert abs(same[0]) < 0.1 * far[0]
    assert kernel_distance(a, b, subsets=2, subset_size=1000, degree=3, seed=0)[2] == 200  # capped at N


def _jpeg(image: torch.Tensor, quality: int) -> torch.Tensor:
    array = ((image.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="JPEG", quality=quality)
    return load_image(io.BytesIO(buffer.getvalue()))


@pytest.mark.data
@pytest.mark.slow
def test_fd_rises_monotonically_with_jpeg_degradation_of_kodak(shared_data):
    files = sorted((shared_data / "kodak").glob("*.png"))[:6]
    if len(files) < 6:
        pytest.skip("kodak is incomplete")
    originals = torch.stack([load_image(f, size=(128, 128)) for f in files])
    net = FeatureNet(resize=128)
    real = net(originals).pooled.double()
    assert abs(frechet_distance(real, real)) < 1e-5 * float(real.var(dim=0).sum())
    distances = []
    for quality in (75, 30, 10, 3):
        degraded = torch.stack([_jpeg(image, quality) for image in originals])
        distances.append(frechet_distance(real, net(degraded).pooled.double()))
    assert all(a < b for a, b in zip(distances, distances[1:], strict=False)), distances
    assert distances[0] > 0
