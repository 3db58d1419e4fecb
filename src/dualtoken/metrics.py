"""Per-image reconstruction quality (torchmetrics), on images in [-1, 1] clamped and mapped to [0, 1]."""

from __future__ import annotations

import torch


def _unit(images: torch.Tensor) -> torch.Tensor:
    return (images.detach().float().clamp(-1, 1) + 1) / 2


def psnr(reconstruction: torch.Tensor, original: torch.Tensor) -> torch.Tensor:
    """PSNR in dB of each image of a batch (B, 3, H, W) -> (B,)."""
    from torchmetrics.functional.image import peak_signal_noise_ratio  # imported on use: keeps the CLI quick

    return peak_signal_noise_ratio(
        _unit(reconstruction), _unit(original), data_range=1.0, reduction="none", dim=(1, 2, 3)
    )


def ssim(reconstruction: torch.Tensor, original: torch.Tensor) -> torch.Tensor:
    """SSIM (11x11 Gaussian window) of each image of a batch (B, 3, H, W) -> (B,)."""
    from torchmetrics.functional.image import structural_similarity_index_measure

    return structural_similarity_index_measure(
        _unit(reconstruction), _unit(original), data_range=1.0, reduction="none"
    )


def bootstrap_mean(values: torch.Tensor, resamples: int = 2000, seed: int = 0) -> dict[str, float]:
    """Mean of per-image ``values`` with its 95 % percentile bootstrap interval (``resamples`` draws of the images
    with replacement): ``{"mean", "low", "high", "n"}``. Given per-image differences of two models on the same
    images it is the paired bootstrap: each draw takes one set of images for both."""
    values = values.detach().double().flatten().cpu()
    generator = torch.Generator().manual_seed(seed)
    index = torch.randint(len(values), (resamples, len(values)), generator=generator)
    means = values[index].mean(dim=1)
    low, high = torch.quantile(means, torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
    return {"mean": float(values.mean()), "low": low, "high": high, "n": len(values)}
