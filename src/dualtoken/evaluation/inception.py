"""The standard FID network (torch-fidelity's Inception-v3) from a local weights file, for the real rFID.

It runs through torchmetrics' ``NoTrainInceptionV3``, which needs the ``torch-fidelity`` package besides the
weights file (``pt_inception-2015-12-05-6726825d.pth``); nothing is downloaded.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..errors import ConfigError
from .protocol import to_uint8


class InceptionFeatures(nn.Module):
    """Images in [-1, 1] -> the 2048-d pool features of the FID Inception network (input rounded to uint8)."""

    name = "inception"
    feature_dim = 2048

    def __init__(self, weights: str | Path) -> None:
        super().__init__()
        from torchmetrics.utilities.imports import _TORCH_FIDELITY_AVAILABLE

        if not Path(weights).is_file():
            raise ConfigError(f"Inception weights file not found: {weights}")
        if not _TORCH_FIDELITY_AVAILABLE:
            raise ConfigError(
                "the standard rFID needs the torch-fidelity package as well as the weights file "
                "(pip install torch-fidelity); without them, use the fd_efficientnet_lite0 metric"
            )
        from torchmetrics.image.fid import NoTrainInceptionV3

        self.net = NoTrainInceptionV3(
            name="inception-v3-compat", features_list=["2048"], feature_extractor_weights_path=str(weights)
        )

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(to_uint8(images)).reshape(images.shape[0], -1).float()  # (B, 2048)
