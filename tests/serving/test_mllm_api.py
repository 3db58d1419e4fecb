"""/v1/chat and /v1/generate against a fake of the MLLM protocol; absent without an MLLM."""

from __future__ import annotations

from io import BytesIO

import numpy as np
import pytest
import torch
from PIL import Image

from dualtoken.io import load_image, to_uint8
from dualtoken.serving import MultimodalModel, create_app

from .conftest import FakeMLLM


def test_the_fake_follows_the_protocol(fake_mllm):
    assert isinstance(fake_mllm, MultimodalModel)


def test_chat_sees_the_preprocessed_image(client, fake_mllm, photo_path, photo_bytes, tiny_tokenizer):
    response = client.post(
        "/v1/chat", files={"image": ("p.png", photo_bytes, "image/png")}, data={"question": "What is this?"}
    )
    assert response.status_code == 200
    (seen,) = fake_mllm.seen_images
    expected = load_image(photo_path, size=tiny_tokenizer.image_size)
    assert torch.equal(seen, expected)
    assert response.json() == {"answer": f"What is this? -> mean {float(expected.mean()):.4f}"}


def test_generate_returns_the_models_image_as_png(client, fake_mllm):
    response = client.post("/v1/generate", json={"prompt": "Draw a cat.", "cfg_scale": 0.5, "seed": 7})
    assert response.status_code == 200 and response.headers["content-type"] == "image/png"
    pixels = np.asarray(Image.open(BytesIO(response.content)))
    assert np.array_equal(pixels, to_uint8(fake_mllm.generate("Draw a cat.", 0.5, 7)[0]))
    again = client.post("/v1/generate", json={"prompt": "Draw a cat.", "cfg_scale": 0.5, "seed": 7})
    other = client.post("/v1/generate", json={"prompt": "Draw a cat.", "cfg_scale": 0.5, "seed": 8})
    assert again.content == response.content and other.content != response.content
    assert client.post("/v1/generate", json={"prompt": "defaults"}).status_code == 200


@pytest.mark.parametrize(
    "body",
    [
        {},
        {"prompt": ""},
        {"prompt": "x" * 201},  # the fixture's max_prompt_chars is 200
        {"prompt": "a", "cfg_scale": -1},
        {"prompt": "a", "cfg_scale": 1e9},
        {"prompt": "a", "seed": -1},
        {"prompt": "a", "seed": 2**64},
        {"prompt": ["a"]},
    ],
)
def test_bad_generate_requests_get_422(client, body):
    assert client.post("/v1/generate", json=body).status_code == 422


def test_bad_chat_requests_get_a_4xx(client, photo_bytes):
    files = {"image": ("p.png", photo_bytes, "image/png")}
    assert client.post("/v1/chat", files=files).status_code == 422  # no question
    assert client.post("/v1/chat", files=files, data={"question": "q" * 201}).status_code == 422
    assert client.post("/v1/chat", data={"question": "hi"}).status_code == 422  # no image
    garbage = client.post("/v1/chat", files={"image": ("x", b"nope", "image/png")}, data={"question": "hi"})
    assert garbage.status_code == 400


def test_without_an_mllm_the_routes_do_not_exist(tiny_tokenizer):
    from fastapi.testclient import TestClient

    with TestClient(create_app(tiny_tokenizer)) as client:
        assert client.get("/v1/models").json()["mllm"] is False
        assert client.post("/v1/generate", json={"prompt": "a"}).status_code == 404
        paths = client.get("/openapi.json").json()["paths"]
        assert "/v1/chat" not in paths and "/v1/generate" not in paths


def test_an_mllm_returning_a_wrong_shape_is_a_server_error(tiny_tokenizer):
    from fastapi.testclient import TestClient

    class Broken(FakeMLLM):
        def generate(self, prompt, cfg_scale, seed):
            return torch.zeros(4, 8, 8)

    app = create_app(tiny_tokenizer, mllm=Broken(tiny_tokenizer.image_size))
    with TestClient(app, raise_server_exceptions=False) as client:
        assert client.post("/v1/generate", json={"prompt": "a"}).status_code == 500
        assert client.get("/healthz").status_code == 200  # the worker keeps serving


def test_chat_uploads_are_resized_to_the_mllms_own_size(tiny_tokenizer, photo_bytes):
    from fastapi.testclient import TestClient

    model = FakeMLLM((16, 16))  # the served tokenizer takes 32x32
    with TestClient(create_app(tiny_tokenizer, mllm=model)) as client:
        files = {"image": ("photo.png", photo_bytes, "image/png")}
        assert client.post("/v1/chat", files=files, data={"question": "What?"}).status_code == 200
    assert tuple(tiny_tokenizer.image_size) != (16, 16)
    assert model.seen_images[0].shape == (3, 16, 16)
