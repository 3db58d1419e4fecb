"""Per-image reconstruction metrics: PSNR and SSIM (torchmetrics), and a perceptual distance on feature maps.

All functions take images on the model's [-1, 1] scale, (B, 3, H, W), and return one value per image (B,), so
that a data set's score is the mean over images whatever the batching or the number of processes.
"""

from __future__ import annotations

import torch
from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

from .protocol import to_unit_range


def psnr_per_image(reconstruction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """PSNR in dB of each image pair on the [0, 1] scale (data range 1)."""
    preds, target = to_unit_range(reconstruction).double(), to_unit_range(target).double()
    return peak_signal_noise_ratio(preds, target, data_range=1.0, reduction="none", dim=(1, 2, 3)).float()


def ssim_per_image(reconstruction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """SSIM of each image pair on the [0, 1] scale (gaussian window 11, sigma 1.5, data range 1), in float32."""
    preds, target = to_unit_range(reconstruction), to_unit_range(target)
    return structural_similarity_index_measure(preds, target, data_range=1.0, reduction="none").float()


def _unit_channels(features: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    return features / (features.pow(2).sum(dim=1, keepdim=True).sqrt() + eps)


def level_distance(levels_a: list[torch.Tensor], levels_b: list[torch.Tensor]) -> torch.Tensor:
    """LPIPS-style distance without learned weights: per level, channel-normalised squared difference summed
    over channels and averaged over positions; summed over levels. (B,)"""
    total = torch.zeros(levels_a[0].shape[0], dtype=torch.float64, device=levels_a[0].device)
    for a, b in zip(levels_a, levels_b, strict=True):
        diff = (_unit_channels(a.double()) - _unit_channels(b.double())).pow(2).sum(dim=1)  # (B, h, w)
        total = total + diff.mean(dim=(1, 2))
    return total.float()

