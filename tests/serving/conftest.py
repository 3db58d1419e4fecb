"""Serving fixtures: a served tiny tokenizer with a fake MLLM, a real photo, and an image-file maker."""

from __future__ import annotations

from io import BytesIO
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dualtoken.serving import ServeConfig, create_app

REPO = Path(__file__).resolve().parents[2]
KODAK_PHOTO = REPO.parent / "shared" / "data" / "kodak" / "kodim23.png"


class FakeMLLM:
    """The MultimodalModel protocol with transparent answers: it echoes what it was given."""

    def __init__(self, image_size: tuple[int, int]) -> None:
        self.image_size = image_size
        self.seen_images: list[torch.Tensor] = []

    def chat(self, image: torch.Tensor, question: str) -> str:
        self.seen_images.append(image)
        return f"{question} -> mean {float(image.mean()):.4f}"

    def generate(self, prompt: str, cfg_scale: float, seed: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed + len(prompt))
        return (torch.rand(1, 3, *self.image_size, generator=g) * 2 - 1) * min(1.0, cfg_scale)


def encode_image(pixels: np.ndarray, fmt: str = "PNG") -> bytes:
    buffer = BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt)
    return buffer.getvalue()


@pytest.fixture(scope="session")
def photo_path(tmp_path_factory) -> Path:
    """A real photo: Kodak's kodim23 where ../shared/data is present, else scikit-image's astronaut."""
    if KODAK_PHOTO.is_file():
        return KODAK_PHOTO
    from skimage import data

    path = tmp_path_factory.mktemp("photo") / "astronaut.png"
    Image.fromarray(data.astronaut()).save(path)
    return path


@pytest.fixture(scope="session")
def photo_bytes(photo_path) -> bytes:
    return photo_path.read_bytes()


@pytest.fixture
def fake_mllm(tiny_tokenizer) -> FakeMLLM:
    return FakeMLLM(tiny_tokenizer.image_size)


@pytest.fixture
def serve_config() -> ServeConfig:
    return ServeConfig(max_body_bytes=2_000_000, max_image_pixels=4_000_000, max_prompt_chars=200)


@pytest.fixture
def app(tiny_tokenizer, fake_mllm, serve_config):
    return create_app(tiny_tokenizer, mllm=fake_mllm, config=serve_config)


@pytest.fixture
def client(app):
    from fastapi.testclient import TestClient

    with TestClient(app) as test_client:
        yield test_client
