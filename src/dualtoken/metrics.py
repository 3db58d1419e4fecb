"""Per-image reconstruction quality (torchmetrics), on images in [-1, 1] clamped and mapped to [0, 1]."""

from __future__ import annotations

import torch
from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure


def _unit(images: torch.Tensor) -> torch.Tensor:
    return (images.detach().float().clamp(-1, 1) + 1) / 2


def psnr(reconstruction: torch.Tensor, original: torch.Tensor) -> torch.Tensor:
    """PSNR in dB of each image of a batch (B, 3, H, W) -> (B,)."""
    return peak_signal_noise_ratio(
        _unit(reconstruction), _unit(original), data_range=1.0, reduction="none", dim=(1, 2, 3)
    )


def ssim(reconstruction: torch.Tensor, original: torch.Tensor) -> torch.Tensor:
    """SSIM (11x11 Gaussian window) of each image of a batch (B, 3, H, W) -> (B,)."""
    return structural_similarity_index_measure(
        _unit(reconstruction), _unit(original), data_range=1.0, reduction="none"
    )
