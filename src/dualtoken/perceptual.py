"""Perceptual distances between reconstructions and inputs, both in [-1, 1]; the one LPIPS of the package.

- LPIPS (Zhang et al. 2018, v0.1; taming's VQGAN losses): the ReLU outputs at five depths of a VGG16 or AlexNet
  trunk, unit-normalised channels, learned 1x1 heads, spatial mean, summed over levels. :class:`LPIPS` is it; the
  training loss ``lpips_vgg16`` (:class:`LPIPSVGG16`) and the evaluation metric (``dualtoken.evaluation.lpips``)
  both use it. It needs torchvision's weights for the trunk (``features.{i}.weight/bias`` keys, read by key
  name: ``vgg16-397923af.pth`` or ``alexnet-owt-7be5be79.pth``, from a local file or from torch's hub cache, where
  ``torch.hub.load_state_dict_from_url`` fetches them once; the trunks are rebuilt here in plain torch with
  torchvision's layer indices) and the LPIPS v0.1 heads (``lin{0..4}.model.1.weight``): by default the copy
  torchmetrics ships, else a user's ``vgg.pth``/``alex.pth``, or the ``lpips`` wheel itself (the lpips and
  torchvision packages are never imported).
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
from torch import nn

from .checkpoint import read_weights
from .errors import CheckpointError, ConfigError

LPIPS_NETS = ("vgg", "alex")
TORCHVISION_NAMES = {"vgg": "vgg16", "alex": "alexnet"}
# torchvision's vgg16().features: an int is a 3x3 conv (padding 1) + ReLU, "M" a 2x2 max-pool
VGG16_LAYOUT = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)
VGG16_CONV_INDICES = (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28)
# LPIPS taps: end index (exclusive) in ``features`` of each of the 5 levels, and their channels
LPIPS_TAPS = {"vgg": (4, 9, 16, 23, 30), "alex": (2, 5, 8, 10, 12)}
LPIPS_CHANNELS = {"vgg": (64, 128, 256, 512, 512), "alex": (64, 192, 384, 256, 256)}
LPIPS_LEVEL_CHANNELS = LPIPS_CHANNELS["vgg"]
# LPIPS input scaling: (x - shift) / scale on [-1, 1] inputs
LPIPS_SHIFT = (-0.030, -0.088, -0.188)
LPIPS_SCALE = (0.458, 0.448, 0.450)
LPIPS_WHEEL_MEMBERS = {net: f"lpips/weights/v0.1/{net}.pth" for net in LPIPS_NETS}
LPIPS_WHEEL_MEMBER = LPIPS_WHEEL_MEMBERS["vgg"]
# channel normalisation: the lpips package's x / (|x| + 1e-10), or torchmetrics' x / sqrt(|x|^2 + 1e-8)
NORMALIZATIONS = ("lpips", "torchmetrics")


def unit_normalize(features: torch.Tensor, eps: float = 1e-10, eps_in_sqrt: bool = False) -> torch.Tensor:
    """Scale each position's channel vector (B, C, H, W) to unit length: ``x / (|x| + eps)``, or with
    ``eps_in_sqrt`` ``x / sqrt(|x|^2 + eps)`` (torchmetrics' form)."""
    squared = features.pow(2).sum(dim=1, keepdim=True)
    return features / ((squared + eps).sqrt() if eps_in_sqrt else squared.sqrt() + eps)


def level_distance(
    a: torch.Tensor, b: torch.Tensor, head: torch.Tensor | None = None, normalization: str = "lpips"
) -> torch.Tensor:
    """Per-image distance of two feature maps (B, C, H, W): squared difference of unit-normalised channels,
    weighted by the 1x1 head ``head`` (1, C, 1, 1) or summed over channels, then averaged over positions -> (B,).
    ``normalization``: "lpips" (the lpips package's, the default) or "torchmetrics" (see :func:`unit_normalize`)."""
    if normalization not in NORMALIZATIONS:
        raise ConfigError(f"unknown normalization {normalization!r}; expected one of {NORMALIZATIONS}")
    eps, in_sqrt = (1e-8, True) if normalization == "torchmetrics" else (1e-10, False)
    diff = (unit_normalize(a, eps, in_sqrt) - unit_normalize(b, eps, in_sqrt)).pow(2)  # (B, C, H, W)
    per_position = (diff * head).sum(dim=1) if head is not None else diff.sum(dim=1)  # (B, H, W)
    return per_position.mean(dim=(1, 2))


# torchvision's ImageNet trunks: where torchvision downloads them, under the file names it uses, so that a file
# torchvision (or anyone) put into torch's hub cache ($TORCH_HOME/hub/checkpoints) is found and reused
TORCHVISION_URLS = {
    "vgg": "https://download.pytorch.org/models/vgg16-397923af.pth",
    "alex": "https://download.pytorch.org/models/alexnet-owt-7be5be79.pth",
}


def trunk_state(spec: str | Path | None, net: str) -> tuple[dict[str, torch.Tensor], str]:
    """The torchvision state dict of an LPIPS trunk and where it came from: a local weights file, or (``spec`` None
    or a URL) torch's hub cache through ``torch.hub.load_state_dict_from_url``, downloaded there once when missing
    (the sha256 prefix in torchvision's file name is checked). Needs torch alone, never torchvision."""
    if spec is not None and "://" not in str(spec):
        return read_state(spec, f"torchvision {net}"), str(spec)
    url = str(spec or TORCHVISION_URLS[net])
    file_name = url.rsplit("/", 1)[-1]
    cached = Path(torch.hub.get_dir()) / "checkpoints" / file_name
    try:
        state = torch.hub.load_state_dict_from_url(
            url, map_location="cpu", check_hash=True, file_name=file_name, weights_only=True, progress=False
        )
    except (OSError, RuntimeError, ValueError) as exc:  # no network (URLError is an OSError), a bad download
        raise CheckpointError(
            f"LPIPS-{net} trunk weights: {cached} is not in torch's hub cache and {url} cannot be fetched ({exc}); "
            f"put torchvision's {file_name} there, or give a local weights file"
        ) from None
    return state, str(cached)


def read_state(path: str | Path, what: str) -> dict[str, torch.Tensor]:
    """A weights file's state dict (:func:`dualtoken.checkpoint.read_weights`); a missing file is a
    :class:`ConfigError`, an unreadable one a :class:`CheckpointError`."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{what} weights file not found: {path}")
    try:
        return read_weights(path)
    except CheckpointError:
        raise
    except Exception as exc:  # any unreadable file is a bad checkpoint (e.g. an unpickling error)
        raise CheckpointError(f"{path}: not a readable {what} weights file ({type(exc).__name__}: {exc})") from None


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


class LPIPSTrunk(nn.Sequential):
    """A torchvision ``features`` stack with torchvision's layer indices (so its weight files load by key name);
    ``forward`` returns the ReLU outputs at the 5 LPIPS taps."""

    def __init__(self, net: str, layers: list[nn.Module]) -> None:
        super().__init__(*layers)
        self.net = net

    def load_torchvision(self, state: dict[str, torch.Tensor], source: str) -> None:
        """Load ``features.{i}.weight/bias`` from a torchvision state dict (other keys are ignored)."""
        name = TORCHVISION_NAMES[self.net]
        own = {}
        for key, value in self.state_dict().items():
            if f"features.{key}" not in state:
                raise CheckpointError(
                    f"{source}: no features.{key}; expected torchvision {name} weights ({name}-*.pth)"
                )
            own[key] = state[f"features.{key}"]
            if own[key].shape != value.shape:
                raise CheckpointError(
                    f"{source}: features.{key} has shape {tuple(own[key].shape)}, not {tuple(value.shape)}; "
                    f"not a torchvision {name} state dict"
                )
        self.load_state_dict(own)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        levels, start = [], 0
        for end in LPIPS_TAPS[self.net]:
            for index in range(start, end):
                x = self[index](x)
            levels.append(x)
            start = end
        return levels


def vgg16_features() -> LPIPSTrunk:
    """torchvision's ``vgg16().features`` (random weights until :meth:`LPIPSTrunk.load_torchvision`)."""
    layers: list[nn.Module] = []
    channels = 3
    for item in VGG16_LAYOUT:
        if item == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
        else:
            layers += [nn.Conv2d(channels, item, kernel_size=3, padding=1), nn.ReLU(inplace=False)]
            channels = item
    return LPIPSTrunk("vgg", layers)


def alexnet_features() -> LPIPSTrunk:
    """torchvision's ``alexnet().features`` (random weights until :meth:`LPIPSTrunk.load_torchvision`)."""
    return LPIPSTrunk(
        "alex",
        [
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
        ],
    )


TRUNKS = {"vgg": vgg16_features, "alex": alexnet_features}
VGG16Features = vgg16_features  # the VGG16 trunk under its former name: ``load_torchvision``, 5 levels out


def default_lpips_heads(net: str = "vgg") -> Path:
    """The LPIPS v0.1 heads file for ``net`` ("vgg" or "alex") shipped inside torchmetrics (identical to the
    lpips wheel's)."""
    import torchmetrics.functional.image.lpips as torchmetrics_lpips

    return Path(torchmetrics_lpips.__file__).parent / "lpips_models" / f"{net}.pth"


def read_lpips_heads(path: str | Path, net: str = "vgg") -> list[torch.Tensor]:
    """The 5 LPIPS heads (1, C, 1, 1) of ``net`` from a ``vgg.pth``/``alex.pth`` heads file or from an
    ``lpips-*.whl`` wheel."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"LPIPS heads file not found: {path} (give lpips' {net}.pth or the lpips wheel)")
    if path.suffix == ".whl":
        member = LPIPS_WHEEL_MEMBERS[net]
        try:
            with zipfile.ZipFile(path) as wheel:
                raw = wheel.read(member)
        except (zipfile.BadZipFile, KeyError) as exc:
            raise CheckpointError(f"{path}: no {member} inside ({exc})") from None
        try:
            state = torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
        except Exception as exc:  # any unreadable member is a bad checkpoint
            raise CheckpointError(f"{path}: cannot read {member}: {exc}") from None
    else:
        state = read_state(path, "LPIPS heads")
    heads = []
    for level, channels in enumerate(LPIPS_CHANNELS[net]):
        names = [k for k in (f"lin{level}.model.1.weight", f"lin{level}.weight") if k in state]
        if not names or tuple(state[names[0]].shape) != (1, channels, 1, 1):
            raise CheckpointError(
                f"{path}: expected lin{level}.model.1.weight of shape (1, {channels}, 1, 1) (LPIPS-{net} heads)"
            )
        heads.append(state[names[0]].float())
    return heads


class LPIPS(PerceptualLoss):
    """LPIPS v0.1 on a VGG16 (``net="vgg"``) or AlexNet (``"alex"``) trunk from torchvision's weights (a local file,
    or torch's hub cache: see :func:`trunk_state`), with
    the LPIPS heads from ``heads`` (default: torchmetrics' copy). ``per_image`` -> (B,) for images in [-1, 1];
    ``forward`` -> their mean (differentiable in the images). ``normalization``: "lpips" (the lpips package's)
    or "torchmetrics" (see :func:`unit_normalize`)."""

    name = "lpips"

    def __init__(
        self,
        net: str,
        trunk_weights: str | Path | None = None,
        heads: str | Path | None = None,
        normalization: str = "lpips",
    ) -> None:
        super().__init__()
        if net not in TRUNKS:
            raise ConfigError(f"LPIPS net {net!r}: expected 'vgg' or 'alex'")
        if normalization not in NORMALIZATIONS:
            raise ConfigError(f"LPIPS normalization {normalization!r}: expected one of {NORMALIZATIONS}")
        self.net_name, self.normalization = net, normalization
        self.features = TRUNKS[net]()
        self.features.load_torchvision(*trunk_state(trunk_weights, net))
        for level, head in enumerate(read_lpips_heads(heads or default_lpips_heads(net), net)):
            self.register_buffer(f"head{level}", head)
        self.register_buffer("shift", torch.tensor(LPIPS_SHIFT).view(1, 3, 1, 1))
        self.register_buffer("scale", torch.tensor(LPIPS_SCALE).view(1, 3, 1, 1))
        self.freeze()

    @property
    def heads(self) -> list[torch.Tensor]:
        """The 5 learned heads (1, C, 1, 1)."""
        return [getattr(self, f"head{level}") for level in range(len(LPIPS_TAPS[self.net_name]))]

    def per_image(self, reconstruction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        both = torch.cat([reconstruction, target]).float()
        levels = self.features((both - self.shift) / self.scale)
        batch = reconstruction.shape[0]
        return sum(
            level_distance(f[:batch], f[batch:], head, self.normalization) for f, head in zip(levels, self.heads)
        )


class LPIPSVGG16(LPIPS):
    """LPIPS v0.1 on VGG16 (the distance taming's VQGAN losses and the release use), the training loss."""

    name = "lpips_vgg16"

    def __init__(self, vgg_weights: str | Path | None = None, heads: str | Path | None = None) -> None:
        super().__init__("vgg", vgg_weights, heads)


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
    if kind == "lpips_vgg16":  # no vgg_weights: torchvision's file through torch's hub cache
        return LPIPSVGG16(vgg_weights or None, lpips_heads)
    if kind == "effnet_lite0":
        return EfficientNetPerceptual(resize=resize)
    raise ConfigError(f"unknown perceptual loss {kind!r}; expected lpips_vgg16, effnet_lite0 or none")
