"""LPIPS from local weight files: torchvision-format trunks load, the distance behaves like a distance."""

import pytest
import torch

from dualtoken.errors import CheckpointError, ConfigError
from dualtoken.evaluation.lpips import LPIPS, alexnet_features, default_lin_weights, vgg16_features


def _torchvision_file(tmp_path, net: str):
    torch.manual_seed(0)
    trunk = vgg16_features() if net == "vgg" else alexnet_features()
    state = {f"features.{k}": v for k, v in trunk.state_dict().items()}
    state["classifier.0.weight"] = torch.zeros(2, 2)  # torchvision files hold the classifier too
    path = tmp_path / f"{net}.pth"
    torch.save(state, path)
    return path, trunk


@pytest.mark.parametrize("net", ["alex", "vgg"])
def test_lpips_loads_torchvision_weights_and_is_a_distance(tmp_path, net):
    path, trunk = _torchvision_file(tmp_path, net)
    lpips = LPIPS(net, path)
    assert torch.equal(lpips.features[0].weight, trunk[0].weight)
    lin = torch.load(default_lin_weights(net), map_location="cpu", weights_only=True)
    assert torch.equal(lpips.heads[0], lin["lin0.model.1.weight"])
    generator = torch.Generator().manual_seed(1)
    a = torch.rand(2, 3, 64, 64, generator=generator) * 2 - 1
    b = (a + 0.3 * torch.randn(a.shape, generator=generator)).clamp(-1, 1)
    assert torch.allclose(lpips(a, a), torch.zeros(2), atol=1e-6)
    assert torch.all(lpips(a, b) > 0)
    torch.testing.assert_close(lpips(a, b), lpips(b, a))


def test_lpips_rejects_missing_and_foreign_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        LPIPS("vgg", tmp_path / "absent.pth")
    path, _ = _torchvision_file(tmp_path, "alex")
    with pytest.raises(CheckpointError, match="vgg16"):
        LPIPS("vgg", path)
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError):
        LPIPS("alex", tmp_path / "junk.pth")


@pytest.mark.parametrize("net", ["alex", "vgg"])
def test_lpips_equals_torchmetrics_lpips_on_the_same_trunk(tmp_path, net):
    """Where torchvision is installed: the same (random) torchvision trunk gives torchmetrics' LPIPS exactly."""
    pytest.importorskip("torchvision")
    from torchmetrics.functional.image.lpips import _LPIPS

    torch.manual_seed(0)
    reference = _LPIPS(pretrained=True, net=net, pnet_rand=True).eval()
    state = {
        f"features.{index}.{name}": value
        for i in range(1, 6)
        for index, module in getattr(reference.net, f"slice{i}").named_children()
        for name, value in module.state_dict().items()
    }
    torch.save(state, tmp_path / "trunk.pth")
    generator = torch.Generator().manual_seed(1)
    a = torch.rand(3, 3, 64, 64, generator=generator) * 2 - 1
    b = (a + 0.3 * torch.randn(a.shape, generator=generator)).clamp(-1, 1)
    with torch.no_grad():
        torch.testing.assert_close(LPIPS(net, tmp_path / "trunk.pth")(a, b), reference(a, b).flatten())
