"""Perceptual distances between reconstructions and inputs, both in [-1, 1].

- ``lpips_vgg16``: LPIPS on VGG16 (taming / Zhang et al. v0.1): five ReLU levels of VGG16's 13 convolutions,
  unit-normalised channels, learned 1x1 heads, spatial mean, summed over levels. It needs two files the user
  provides, torchvision's VGG16 ImageNet weights (``features.{i}.weight`` keys, e.g. ``vgg16-397923af.pth``), and
  the LPIPS v0.1 heads (``lin{0..4}.model.1.weight``): by default the copy torchmetrics ships, else the
  ``vgg.pth`` inside the ``lpips`` wheel, or the wheel itself (the lpips package is never imported).
- ``effnet_lite0``: the same unit-normalised distance, without learned heads, on the five resolution levels of
  EfficientNet-Lite0 with real ImageNet weights (``dualtoken.features``): usable where no VGG weights are present.
  It is *not* LPIPS and is always reported under its own name.
"""

from __future__ import annotations

import io
import zipfile
from abc import ABC, abstractmethod
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .checkpoint import read_weights
from .errors import CheckpointError, ConfigError

# torchvision's vgg16().features: conv indices, with a 2x2 max-pool before levels 2..5
VGG16_CONV_INDICES = (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28)
VGG16_LEVELS = ((0, 1), (2, 3), (4, 5, 6), (7, 8, 9), (10, 11, 12))  # conv positions per level
VGG16_CHANNELS = (64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512)
LPIPS_LEVEL_CHANNELS = (64, 128, 256, 512, 512)
# LPIPS input scaling: (x - shift) / scale on [-1, 1] inputs
LPIPS_SHIFT = (-0.030, -0.088, -0.188)
LPIPS_SCALE = (0.458, 0.448, 0.450)
LPIPS_WHEEL_MEMBER = "lpips/weights/v0.1/vgg.pth"


def unit_normalize(features: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    """Scale each position's channel vector (B, C, H, W) to unit length."""
    return features / (features.pow(2).sum(dim=1, keepdim=True).sqrt() + eps)


def level_distance(a: torch.Tensor, b: torch.Tensor, head: torch.Tensor | None = None) -> torch.Tensor:
    """Per-image distance of two feature maps (B, C, H, W): squared difference of unit-normalised channels,
    weighted by ``head`` (1, C, 1, 1) or summed over channels, then averaged over positions -> (B,)."""
    diff = (unit_normalize(a) - unit_normalize(b)).pow(2)  # (B, C, H, W)
    per_position = (diff * head).sum(dim=1) if head is not None else diff.sum(dim=1)  # (B, H, W)
    return per_position.mean(dim=(1, 2))


class PerceptualLoss(nn.Module, ABC):
    """A frozen feature network; ``forward(reconstruction, target)`` -> the batch-mean distance (scalar)."""

    name: str = "perceptual"

    def freeze(self) -> None:
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> PerceptualLoss:
        return super().train(False)  # frozen statistics, whatever the trainer's mode

    @abstractmethod
    def per_image(self, reconstruction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The distance of each image pair -> (B,)."""

    def forward(self, reconstruction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self.per_image(reconstruction, target).mean()


class VGG16Features(nn.Module):
    """The 13 convolutions of VGG16 (ReLU after each, max-pool between levels); returns the 5 levels' last ReLU."""

    def __init__(self) -> None:
        super().__init__()
        channels_in = (3,) + VGG16_CHANNELS[:-1]
        self.convs = nn.ModuleList(nn.Conv2d(i, o, 3, padding=1) for i, o in zip(channels_in, VGG16_CHANNELS))

    def load_torchvision(self, state: dict[str, torch.Tensor], source: str) -> None:
        """Load ``features.{i}.weight/bias`` from a torchvision VGG16 state dict (other keys are ignored)."""
        own = {}
        for position, index in enumerate(VGG16_CONV_INDICES):
            for kind in ("weight", "bias"):
                key = f"features.{index}.{kind}"
                if key not in state:
                    raise CheckpointError(
                        f"{source}: no {key}; expected torchvision VGG16 weights (vgg16-*.pth)"
                    )
                own[f"convs.{position}.{kind}"] = state[key]
        expected = {k: v.shape for k, v in self.state_dict().items()}
        wrong = [k for k, v in own.items() if v.shape != expected[k]]
        if wrong:
            raise CheckpointError(f"{source}: {wrong[0]} has shape {tuple(own[wrong[0]].shape)}; not VGG16")
        self.load_state_dict(own)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        levels = []
        for number, positions in enumerate(VGG16_LEVELS):
            if number:
                x = F.max_pool2d(x, 2)
            for position in positions:
                x = F.relu(self.convs[position](x))
            levels.append(x)
        return levels


def default_lpips_heads() -> Path:
    """The LPIPS v0.1 VGG heads file shipped inside torchmetrics (identical to the lpips wheel's)."""
    import torchmetrics.functional.image.lpips as torchmetrics_lpips

    return Path(torchmetrics_lpips.__file__).parent / "lpips_models" / "vgg.pth"


def read_lpips_heads(path: str | Path) -> list[torch.Tensor]:
    """The 5 LPIPS-VGG heads (1, C, 1, 1) from a ``vgg.pth`` heads file or from an ``lpips-*.whl`` wheel."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"LPIPS heads file not found: {path} (give lpips' vgg.pth or the lpips wheel)")
    if path.suffix == ".whl":
        try:
            with zipfile.ZipFile(path) as wheel:
                raw = wheel.read(LPIPS_WHEEL_MEMBER)
        except (zipfile.BadZipFile, KeyError) as exc:
            raise CheckpointError(f"{path}: no {LPIPS_WHEEL_MEMBER} inside ({exc})") from None
        try:
            state = torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
        except (RuntimeError, EOFError, ValueError) as exc:
            raise CheckpointError(f"{path}: cannot read {LPIPS_WHEEL_MEMBER}: {exc}") from None
    else:
        state = read_weights(path)
    heads = []
    for level, channels in enumerate(LPIPS_LEVEL_CHANNELS):
        names = [k for k in (f"lin{level}.model.1.weight", f"lin{level}.weight") if k in state]
        if not names or tuple(state[names[0]].shape) != (1, channels, 1, 1):
            raise CheckpointError(
                f"{path}: expected lin{level}.model.1.weight of shape (1, {channels}, 1, 1)"
            )
        heads.append(state[names[0]].float())
    return heads


class LPIPSVGG16(PerceptualLoss):
    """LPIPS v0.1 on VGG16 (the distance taming's VQGAN losses and the release use)."""

    name = "lpips_vgg16"

    def __init__(self, vgg_weights: str | Path, heads: str | Path | None = None) -> None:
        super().__init__()
        self.features = VGG16Features()
        self.features.load_torchvision(read_weights(Path(vgg_weights)), str(vgg_weights))
        for level, head in enumerate(read_lpips_heads(heads or default_lpips_heads())):
            self.register_buffer(f"head{level}", head)
        self.register_buffer("shift", torch.tensor(LPIPS_SHIFT).view(1, 3, 1, 1))
        self.register_buffer("scale", torch.tensor(LPIPS_SCALE).view(1, 3, 1, 1))
        self.freeze()

    def per_image(self, reconstruction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        both = torch.cat([reconstruction, target]).float()
        levels = self.features((both - self.shift) / self.scale)
        batch = reconstruction.shape[0]
        return sum(
            level_distance(f[:batch], f[batch:], getattr(self, f"head{i}")) for i, f in enumerate(levels)
        )


class EfficientNetPerceptual(PerceptualLoss):
    """Unit-normalised feature distance on EfficientNet-Lite0's five levels (ImageNet weights); not LPIPS."""

    name = "effnet_lite0"

    def __init__(self, resize: int | None = 224, pretrained: bool = True) -> None:
        super().__init__()
        from .features import EfficientNetFeatures

        self.features = EfficientNetFeatures(resize=resize, pretrained=pretrained)
        self.freeze()

    def per_image(self, reconstruction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        both = torch.cat([reconstruction, target]).float()
        levels = self.features.levels(both)
        batch = reconstruction.shape[0]
        return sum(level_distance(f[:batch], f[batch:]) for f in levels)


def build_perceptual(
    kind: str, vgg_weights: str | None = None, lpips_heads: str | None = None, resize: int | None = 224
) -> PerceptualLoss | None:
    """The perceptual loss a config names: ``lpips_vgg16``, ``effnet_lite0``, or ``none`` (None)."""
    if kind == "none":
        return None
    if kind == "lpips_vgg16":
        if not vgg_weights:
            raise ConfigError(
                "perceptual 'lpips_vgg16' needs loss.vgg_weights (torchvision's vgg16-*.pth); use 'effnet_lite0' "
                "where VGG weights are not available"
            )
        return LPIPSVGG16(vgg_weights, lpips_heads)
    if kind == "effnet_lite0":
        return EfficientNetPerceptual(resize=resize)
    raise ConfigError(f"unknown perceptual loss {kind!r}; expected lpips_vgg16, effnet_lite0 or none")
