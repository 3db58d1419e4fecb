"""Shared fixtures: a small random tokenizer, and the shared data / parity folders (skipped where absent)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


def _shared(sub: str) -> Path:
    path = SHARED / sub
    if not path.exists():
        pytest.skip(f"{path} is absent")
    return path


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data (skips the test where absent)."""
    return _shared("data")


@pytest.fixture(scope="session")
def parity_dir() -> Path:
    """../shared/parity (skips the test where absent)."""
    return _shared("parity")


@pytest.fixture(autouse=True)
def _few_threads():
    torch.set_num_threads(1)
    yield


@pytest.fixture(scope="session", autouse=True)
def _onnx_cache(tmp_path_factory):
    """Exported graphs of the onnxruntime backend go to a folder of this test session, never the user's cache."""
    import os

    os.environ["DUALTOKEN_CACHE"] = str(tmp_path_factory.mktemp("dualtoken-cache"))
    yield


@pytest.fixture(autouse=True)
def _eager_by_default():
    """API tests run PyTorch eager unless they ask for a backend (tests/core/test_backend.py does); a command run
    through ``main`` sets the backend from its ``--backend`` option (default auto), as it does for users."""
    from dualtoken.backend import set_inference_backend

    set_inference_backend("torch")
    yield
    set_inference_backend("torch")


def make_tiny_tokenizer(seed: int = 0):
    from dualtoken import DualTokenizer

    torch.manual_seed(seed)
    return DualTokenizer.from_config("dualtoken-tiny").eval()


@pytest.fixture
def tiny_tokenizer():
    """A randomly initialised ``dualtoken-tiny`` (64x64 input, 8x8 grid, Q=4, K=256), eval mode."""
    return make_tiny_tokenizer()


@pytest.fixture
def base_dir(tiny_tokenizer, tmp_path: Path) -> Path:
    """``tiny_tokenizer`` saved in float16, as the shipped model is: a base model to fine-tune."""
    return tiny_tokenizer.save_pretrained(tmp_path / "base", dtype=torch.float16)


@pytest.fixture
def tiny_images() -> torch.Tensor:
    """Two smooth 64x64 images in [-1, 1]."""
    g = torch.Generator().manual_seed(0)
    low = torch.rand(2, 3, 8, 8, generator=g) * 2 - 1
    return torch.nn.functional.interpolate(low, size=(64, 64), mode="bilinear", align_corners=False)
