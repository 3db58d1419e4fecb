"""LPIPS (Zhang et al. 2018) from local weight files only: a VGG16 or AlexNet trunk read from a torchvision
state-dict file, and the learned linear layers of lpips v0.1 (by default the copy shipped inside torchmetrics).

The trunks are rebuilt here in plain torch with torchvision's layer indices, so torchvision's weight files load
as they are and torchvision itself is not needed. The scaling layer and linear layers are torchmetrics' own.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from torchmetrics.functional.image.lpips import NetLinLayer, ScalingLayer

from ..errors import CheckpointError, ConfigError

# torchvision ``features`` layouts: an int is a 3x3 conv (padding 1) + ReLU, "M" a 2x2 max-pool
VGG16_LAYOUT = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)
# LPIPS taps: end index (exclusive) in ``features`` of each of the 5 slices, and their channels
SLICE_ENDS = {"vgg": (4, 9, 16, 23, 30), "alex": (2, 5, 8, 10, 12)}
CHANNELS = {"vgg": (64, 128, 256, 512, 512), "alex": (64, 192, 384, 256, 256)}


def vgg16_features() -> nn.Sequential:
    layers: list[nn.Module] = []
    channels = 3
    for item in VGG16_LAYOUT:
        if item == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
        else:
            layers += [nn.Conv2d(channels, item, kernel_size=3, padding=1), nn.ReLU(inplace=False)]
            channels = item
    return nn.Sequential(*layers)


def alexnet_features() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, 64, kernel_size=11, stride=4, padding=2),
        nn.ReLU(inplace=False),
        nn.MaxPool2d(kernel_size=3, stride=2),
        nn.Conv2d(64, 192, kernel_size=5, padding=2),
        nn.ReLU(inplace=False),
        nn.MaxPool2d(kernel_size=3, stride=2),
        nn.Conv2d(192, 384, kernel_size=3, padding=1),
        nn.ReLU(inplace=False),
        nn.Conv2d(384, 256, kernel_size=3, padding=1),
        nn.ReLU(inplace=False),
        nn.Conv2d(256, 256, kernel_size=3, padding=1),
        nn.ReLU(inplace=False),
    )


def _load_state(path: str | Path, what: str) -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{what} weights file not found: {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # any unreadable file is a bad checkpoint
        raise CheckpointError(f"{path}: not a readable {what} weights file ({type(exc).__name__}: {exc})") from None
    return state.get("state_dict", state) if isinstance(state, dict) else state


def default_lin_weights(net: str) -> Path:
    """The lpips v0.1 linear-layer weights torchmetrics ships for ``net`` ("vgg" or "alex")."""
    import torchmetrics.functional.image.lpips as tm_lpips

    return Path(tm_lpips.__file__).parent / "lpips_models" / f"{net}.pth"


class LPIPS(nn.Module):
    """LPIPS distance per image pair: images (B, 3, H, W) in [-1, 1] -> (B,)."""

    def __init__(self, net: str, trunk_weights: str | Path, lin_weights: str | Path | None = None) -> None:
        super().__init__()
        if net not in SLICE_ENDS:
            raise ConfigError(f"LPIPS net {net!r}: expected 'vgg' or 'alex'")
        self.net_name = net
        self.scaling = ScalingLayer()
        self.features = vgg16_features() if net == "vgg" else alexnet_features()
        self.lins = nn.ModuleList([NetLinLayer(c, use_dropout=True) for c in CHANNELS[net]])
        trunk = _load_state(trunk_weights, f"torchvision {net}")
        trunk = {k[len("features."):]: v for k, v in trunk.items() if k.startswith("features.")}
        try:
            self.features.load_state_dict(trunk, strict=True)
        except RuntimeError as exc:
            raise CheckpointError(
                f"{trunk_weights}: not a torchvision {'vgg16' if net == 'vgg' else 'alexnet'} state dict "
                f"(keys features.N.weight/bias expected): {str(exc).splitlines()[0]}"
            ) from None
        lin = _load_state(lin_weights or default_lin_weights(net), "LPIPS linear-layer")
        lin = {k: v for k, v in lin.items() if k.startswith("lin")}
        try:
            self.lins.load_state_dict({k[len("lin"):]: v for k, v in lin.items()}, strict=True)
        except RuntimeError as exc:
            raise CheckpointError(f"LPIPS linear layers do not fit {net}: {str(exc).splitlines()[0]}") from None
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> LPIPS:
        return super().train(False)

    def _levels(self, images: torch.Tensor) -> list[torch.Tensor]:
        x, start, out = self.scaling(images.float()), 0, []
        for end in SLICE_ENDS[self.net_name]:
            for layer in self.features[start:end]:
                x = layer(x)
            out.append(x)
            start = end
        return out

    @torch.no_grad()
    def forward(self, reconstruction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        total = torch.zeros(target.shape[0], device=target.device)
        for lin, a, b in zip(self.lins, self._levels(reconstruction), self._levels(target), strict=True):
            a = a / torch.sqrt(1e-8 + a.pow(2).sum(dim=1, keepdim=True))
            b = b / torch.sqrt(1e-8 + b.pow(2).sum(dim=1, keepdim=True))
            total = total + lin((a - b).pow(2)).mean(dim=(1, 2, 3))
        return total
