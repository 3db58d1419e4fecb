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
