"""Set-level distances between the features of the inputs and of their reconstructions.

The Fréchet distance uses torchmetrics' ``FrechetInceptionDistance`` with a custom feature extractor (its states
are feature sums, reduced across processes by torchmetrics itself); KID uses torchmetrics'
``KernelInceptionDistance`` on the features of the whole set in data order, with a fixed seed for its subsets.
Neither needs torch-fidelity or torchvision; the names say which network made the features.
"""

from __future__ import annotations

import warnings

import torch
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.image.kid import KernelInceptionDistance

from .feature_net import PrecomputedFeatures


def frechet_metric(num_features: int) -> FrechetInceptionDistance:
    """A torchmetrics FID whose ``update`` takes precomputed features (B, num_features) instead of images."""
    return FrechetInceptionDistance(feature=PrecomputedFeatures(num_features), reset_real_features=True)


def frechet_distance(real: torch.Tensor, fake: torch.Tensor) -> float:
    """FD between two feature sets (N, F) in one process (a convenience for tests and notebooks)."""
    metric = FrechetInceptionDistance(feature=PrecomputedFeatures(real.shape[1]), sync_on_compute=False)
    metric.update(real, real=True)
    metric.update(fake, real=False)
    return float(metric.compute())


def kernel_distance(
    real: torch.Tensor, fake: torch.Tensor, subsets: int, subset_size: int, degree: int, seed: int
) -> tuple[float, float, int]:
    """KID (mean, std over subsets) between feature sets (N, F) in data order, and the subset size used.

    The subset size is capped at N; the random subsets come from a generator seeded with ``seed`` so a run is
    reproducible and a multi-process run (features gathered in data order) equals a single-process one.
    """
    size = min(subset_size, real.shape[0], fake.shape[0])
    with warnings.catch_warnings():  # its warning that all features are kept: that is the point here
        warnings.simplefilter("ignore", UserWarning)
        metric = KernelInceptionDistance(
            feature=PrecomputedFeatures(real.shape[1]), subsets=subsets, subset_size=size, degree=degree,
            sync_on_compute=False,
        )
    metric.update(real.double(), real=True)
    metric.update(fake.double(), real=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        mean, std = metric.compute()
    return float(mean), float(std), size
