"""Perceptual losses: LPIPS-VGG16 from user-given weight files (heads from a file or a wheel), EfficientNet-Lite0."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from dualtoken.errors import CheckpointError
from dualtoken.perceptual import (
    LPIPS_WHEEL_MEMBER,
    LPIPSVGG16,
    VGG16_CONV_INDICES,
    EfficientNetPerceptual,
    build_perceptual,
    default_lpips_heads,
    read_lpips_heads,
)


@pytest.fixture(scope="module")
def vgg_files(tmp_path_factory) -> tuple[Path, Path, dict]:
    """A torchvision-layout VGG16 state dict (random, with classifier keys) and a lpips-style heads file."""
    folder = tmp_path_factory.mktemp("vgg")
    g = torch.Generator().manual_seed(0)
    channels = (3, 64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512)
    state = {}
    for n, index in enumerate(VGG16_CONV_INDICES):
        state[f"features.{index}.weight"] = (
            torch.randn(channels[n + 1], channels[n], 3, 3, generator=g) * 0.05
        )
        state[f"features.{index}.bias"] = torch.randn(channels[n + 1], generator=g) * 0.01
    state["classifier.0.weight"] = torch.zeros(4, 4)
    heads = {
        f"lin{i}.model.1.weight": torch.rand(1, c, 1, 1, generator=g)
        for i, c in enumerate((64, 128, 256, 512, 512))
    }
    torch.save(state, folder / "vgg16.pth")
    torch.save(heads, folder / "heads.pth")
    return folder / "vgg16.pth", folder / "heads.pth", {"state": state, "heads": heads}


def _reference_lpips(state: dict, heads: dict, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """LPIPS written out with functional ops over torchvision's ``features`` indices (the lpips package's slices)."""
    shift = torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1)
    scale = torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1)
    ends, total = (4, 9, 16, 23, 30), 0.0
    feats = []
    for z in ((x - shift) / scale, (y - shift) / scale):
        levels, start = [], 0
        for end in ends:
            for index in range(start, end):
                if f"features.{index}.weight" in state:
                    z = F.conv2d(
                        z, state[f"features.{index}.weight"], state[f"features.{index}.bias"], padding=1
                    )
                elif index in (4, 9, 16, 23):
                    z = F.max_pool2d(z, 2)
                else:
                    z = F.relu(z)
            levels.append(z)
            start = end
        feats.append(levels)
    for level, (a, b) in enumerate(zip(*feats)):
        a = a / (a.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
        b = b / (b.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
        total = total + F.conv2d((a - b) ** 2, heads[f"lin{level}.model.1.weight"]).mean(dim=(1, 2, 3))
    return total


def test_lpips_matches_a_functional_rewrite_and_trains(vgg_files):
    vgg, heads, raw = vgg_files
    loss = LPIPSVGG16(vgg, heads)
    g = torch.Generator().manual_seed(1)
    x, y = torch.rand(2, 3, 32, 32, generator=g) * 2 - 1, torch.rand(2, 3, 32, 32, generator=g) * 2 - 1
    torch.testing.assert_close(loss.per_image(x, y), _reference_lpips(raw["state"], raw["heads"], x, y))
    assert float(loss(x, x)) == pytest.approx(0.0, abs=1e-6)
    x.requires_grad_(True)
    loss(x, y).backward()
    assert x.grad.abs().sum() > 0
    assert not any(p.requires_grad for p in loss.parameters())
    assert loss.train().training is False


def test_lpips_heads_from_a_wheel_and_the_torchmetrics_copy(vgg_files, tmp_path: Path):
    _, heads, raw = vgg_files
    wheel = tmp_path / "lpips-0.1.4-py3-none-any.whl"
    buffer = io.BytesIO()
    torch.save(raw["heads"], buffer)
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr(LPIPS_WHEEL_MEMBER, buffer.getvalue())
    for a, b in zip(read_lpips_heads(wheel), read_lpips_heads(heads)):
        assert torch.equal(a, b)
    shipped = read_lpips_heads(default_lpips_heads())
    assert [h.shape[1] for h in shipped] == [64, 128, 256, 512, 512]


def test_bad_lpips_files_raise(vgg_files, tmp_path: Path):
    vgg, heads, raw = vgg_files
    with pytest.raises(CheckpointError, match="features.0.weight"):
        LPIPSVGG16(heads, heads)
    broken = tmp_path / "broken.whl"
    broken.write_bytes(b"not a zip")
    with pytest.raises(CheckpointError):
        read_lpips_heads(broken)


def test_efficientnet_perceptual_is_its_own_distance():
    loss = build_perceptual("effnet_lite0", resize=64)
    assert isinstance(loss, EfficientNetPerceptual) and loss.name == "effnet_lite0"
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 32, 32, generator=g) * 2 - 1
    noisy = (x + 0.3 * torch.randn(x.shape, generator=g)).clamp(-1, 1)
    assert float(loss(x, x)) == pytest.approx(0.0, abs=1e-6)
    near, far = loss.per_image(noisy, x), loss.per_image(-x, x)
    assert torch.all(near > 0) and torch.all(far > near)


@pytest.fixture
def hub_dir(tmp_path, monkeypatch) -> Path:
    """An empty torch hub directory, and no network: a download attempt fails as it would offline."""
    from urllib.error import URLError

    def offline(*_args, **_kwargs):
        raise URLError("no network in this test")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))  # torch.hub.get_dir() -> $TORCH_HOME/hub
    return tmp_path / "torch" / "hub"


def test_vgg_weights_come_from_torch_hub_cache_under_torchvisions_file_name(vgg_files, hub_dir):
    vgg, heads, raw = vgg_files
    with pytest.raises(CheckpointError, match="vgg16-397923af.pth is not in torch's hub cache"):
        build_perceptual("lpips_vgg16")  # no loss.vgg_weights, nothing cached, no network: one clear error
    (hub_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
    (hub_dir / "checkpoints" / "vgg16-397923af.pth").write_bytes(vgg.read_bytes())  # as torchvision leaves it
    from_cache, from_file = build_perceptual("lpips_vgg16"), LPIPSVGG16(vgg)  # the cache, or a local path
    for index in VGG16_CONV_INDICES:
        assert torch.equal(from_cache.features.state_dict()[f"{index}.weight"], raw["state"][f"features.{index}.weight"])
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    assert torch.equal(from_cache.per_image(x, -x), from_file.per_image(x, -x))
