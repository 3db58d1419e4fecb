"""The HTTP API through the ASGI test client: results equal the Python API's, every bad input is a 4xx."""

from __future__ import annotations

import asyncio
from io import BytesIO

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from dualtoken import metrics
from dualtoken.io import load_image, to_uint8
from dualtoken.serving import ServeConfig, create_app

from .conftest import encode_image
from .test_limits import png_header_only


def upload(data: bytes, name: str = "photo.png") -> dict:
    return {"image": (name, data, "application/octet-stream")}


def png_pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(BytesIO(data)).convert("RGB"))


def data_url_pixels(url: str) -> np.ndarray:
    import base64

    prefix = "data:image/png;base64,"
    assert url.startswith(prefix)
    return png_pixels(base64.b64decode(url[len(prefix) :]))


@pytest.fixture
def photo_tensor(photo_path, tiny_tokenizer) -> torch.Tensor:
    return load_image(photo_path, size=tiny_tokenizer.image_size)


def test_models_health_and_schema(client, tiny_tokenizer):
    models = client.get("/v1/models").json()
    assert models["mllm"] is True
    (info,) = models["models"]
    assert info["name"] == "dualtoken-tiny" and info["grid"] == list(tiny_tokenizer.grid)
    assert info["pixel_depth"] == tiny_tokenizer.pixel_depth
    assert info["codebook_size"] == {"pixel": 256, "semantic": 256}
    assert info["meaning"]["unavailable"].startswith("no zero-shot classifier")
    assert models["limits"] == {
        "max_body_bytes": 2_000_000,
        "max_image_pixels": 4_000_000,
        "allowed_formats": ["PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF"],
        "max_prompt_chars": 200,
        "max_cfg_scale": 50.0,
    }
    health = client.get("/healthz").json()
    assert health["status"] == "ok" and set(health["pending"]) == {
        "encode",
        "reconstruct",
        "decode",
        "chat",
        "generate",
    }
    paths = client.get("/openapi.json").json()["paths"]
    assert {
        "/v1/encode",
        "/v1/decode",
        "/v1/reconstruct",
        "/v1/models",
        "/healthz",
        "/v1/chat",
        "/v1/generate",
    } <= set(paths)


def test_encode_returns_the_tokenizers_codes(client, tiny_tokenizer, photo_bytes, photo_tensor):
    body = client.post("/v1/encode", files=upload(photo_bytes)).json()
    expected = tiny_tokenizer.encode(photo_tensor[None])
    for branch in ("pixel", "semantic"):
        assert body[branch]["shape"] == [8, 8, 4]
        assert body[branch]["codebook_size"] == 256
        assert torch.equal(torch.tensor(body[branch]["codes"]), getattr(expected, branch)[0])


@pytest.mark.parametrize("k", [1, 3, None])
def test_decode_returns_the_tokenizers_pixels(client, tiny_tokenizer, photo_tensor, k):
    codes = tiny_tokenizer.encode(photo_tensor[None]).pixel[0]  # (8, 8, 4)
    request = {"pixel": codes.tolist()} if k is None else {"pixel": codes.tolist(), "k": k}
    response = client.post("/v1/decode", json=request)
    assert response.status_code == 200 and response.headers["content-type"] == "image/png"
    expected = to_uint8(tiny_tokenizer.decode(codes[None, ..., : k or 4]))[0]
    assert np.array_equal(png_pixels(response.content), expected)


def test_decode_accepts_a_depth_prefix_alone(client, tiny_tokenizer, photo_tensor):
    codes = tiny_tokenizer.encode(photo_tensor[None]).pixel[0, ..., :2]
    response = client.post("/v1/decode", json={"pixel": codes.tolist()})
    expected = to_uint8(tiny_tokenizer.decode(codes[None]))[0]
    assert np.array_equal(png_pixels(response.content), expected)


def test_reconstruct_reports_every_depth_prefix(client, tiny_tokenizer, photo_bytes, photo_tensor):
    body = client.post("/v1/reconstruct", files=upload(photo_bytes)).json()
    tokens = tiny_tokenizer.encode(photo_tensor[None])
    assert np.array_equal(data_url_pixels(body["original"]), to_uint8(photo_tensor))
    assert [step["k"] for step in body["steps"]] == [1, 2, 3, 4]
    for step in body["steps"]:
        decoded = tiny_tokenizer.decode(tokens.pixel[..., : step["k"]])
        assert np.array_equal(data_url_pixels(step["image"]), to_uint8(decoded)[0])
        assert step["psnr"] == pytest.approx(float(metrics.psnr(decoded, photo_tensor[None])[0]), abs=1e-3)
        assert step["ssim"] == pytest.approx(float(metrics.ssim(decoded, photo_tensor[None])[0]), abs=1e-4)
    for branch in ("pixel", "semantic"):
        view = body[branch]
        codes = getattr(tokens, branch)[0]
        assert torch.equal(torch.tensor(view["codes"]), codes)
        assert len(view["token_maps"]) == 4 and len(view["code_maps"]) == 4
        assert data_url_pixels(view["token_maps"][0]).shape == (8, 8, 3)
        assert data_url_pixels(view["code_maps"][3]).shape == (8, 8, 3)
        assert view["usage"]["unique"] == codes.unique().numel()
    assert body["meaning"] is None  # the tiny model has no classifier


def test_reconstruct_says_what_the_semantic_codes_mean(photo_bytes):
    from fastapi.testclient import TestClient

    from dualtoken import DualTokenizer
    from dualtoken.meaning import build_reader

    tokenizer = DualTokenizer.from_pretrained("dualtoken-efflite0")
    with TestClient(create_app(tokenizer)) as client:
        info = client.get("/v1/models").json()["models"][0]
        body = client.post("/v1/reconstruct", files=upload(photo_bytes)).json()
    assert info["meaning"] == {
        "classifier": "backbone classifier head (ImageNet-1k)",
        "reference": "the pretrained tower, unquantized",
    }
    image = load_image(BytesIO(photo_bytes), tokenizer.image_size)[None]  # what the server's preprocessing gives
    (expected,) = build_reader(tokenizer)[0].read(image, torch.tensor(body["semantic"]["codes"])[None])
    meaning = body["meaning"]
    assert len(meaning["codes"]) == tokenizer.semantic_depth and len(meaning["unquantized"]) == 5  # one reading per depth
    assert [g["name"] for g in meaning["codes"][-1]] == [g.name for g in expected.codes[-1]]
    assert [g["name"] for g in meaning["unquantized"]] == [g.name for g in expected.unquantized]


def test_the_page_and_its_assets(client):
    page = client.get("/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    for element in (
        'id="depth-slider"',
        'id="recon-image"',
        'id="pixel-map"',
        'id="semantic-map"',
        'id="psnr-chart"',
    ):
        assert element in page.text
    assert client.get("/static/app.js").headers["content-type"].startswith("text/javascript")
    assert client.get("/static/style.css").headers["content-type"].startswith("text/css")
    assert client.get("/favicon.ico").headers["content-type"] == "image/svg+xml"
    assert "https://" not in page.text
    for name in ("missing.js", "..%2Fapp.py", "%2Fetc%2Fpasswd"):
        assert client.get(f"/static/{name}").status_code == 404


def test_docs_is_an_offline_api_reference_of_every_route(client):
    docs = client.get("/docs")
    assert docs.status_code == 200 and docs.headers["content-type"].startswith("text/html")
    paths = client.get("/openapi.json").json()["paths"]
    for path, methods in paths.items():
        for method in methods:
            assert f"<span class=method>{method.upper()}</span> {path}</h2>" in docs.text
    assert "<script" not in docs.text and "http://" not in docs.text and "https://" not in docs.text  # no CDN
    assert "<code>pixel</code> (required)" in docs.text  # the decode request's fields
    assert 'href="/openapi.json"' in docs.text


BAD_UPLOADS = {
    "garbage": (b"definitely not an image", 400, "not a readable image"),
    "empty": (b"", 400, "upload: empty file (0 bytes); expected an image file (PNG, JPEG, "),
    "truncated": (encode_image(np.full((64, 64, 3), 90, np.uint8))[:120], 400, "not a readable image"),
    "bomb header": (png_header_only(100_000, 100_000), 413, "too large"),
    "too many pixels": (encode_image(np.zeros((2100, 2000), bool)), 413, "at most 4000000"),
    "body over limit": (b"\x89PNG" + b"0" * 2_000_000, 413, "request body too large"),
}


@pytest.mark.parametrize("route", ["/v1/encode", "/v1/reconstruct"])
@pytest.mark.parametrize("case", sorted(BAD_UPLOADS))
def test_bad_uploads_get_a_4xx_with_a_reason(client, route, case):
    data, status, message = BAD_UPLOADS[case]
    response = client.post(route, files=upload(data))
    assert response.status_code == status
    assert message in response.json()["detail"]


def test_an_empty_file_gets_one_wording_from_the_command_line_and_the_server(client, tiny_tokenizer, tmp_path,
                                                                              capsys):
    from dualtoken.cli.main import main

    (tmp_path / "zero.jpg").write_bytes(b"")
    model = tiny_tokenizer.save_pretrained(tmp_path / "model")
    assert main(["encode", str(tmp_path / "zero.jpg"), "--model", str(model), "--out", str(tmp_path / "t.safetensors")]) == 2
    cli = capsys.readouterr().err.strip().splitlines()[-1]
    served = client.post("/v1/encode", files=upload(b"", "zero.jpg")).json()["detail"]
    fault = "empty file (0 bytes); expected an image file ("
    assert cli.endswith(f"{tmp_path / 'zero.jpg'}: {fault}PNG, JPEG, WebP, ...)") and served.startswith(f"upload: {fault}")


def test_malformed_upload_requests_get_422(client):
    assert client.post("/v1/encode").status_code == 422
    assert client.post("/v1/encode", data={"image": "text, not a file"}).status_code == 422
    assert client.post("/v1/encode", json={"image": "x"}).status_code == 422


def _grid(cell, rows=8, cols=8):
    return [[list(cell) for _ in range(cols)] for _ in range(rows)]


BAD_CODES = {
    "wrong rows": ({"pixel": _grid([1], rows=7)}, 400, "expected a nested list of shape (8, 8, q)"),
    "wrong columns": ({"pixel": _grid([1], cols=9)}, 400, "a row has 9 columns"),
    "ragged depth": ({"pixel": _grid([1, 2])[:7] + [_grid([1])[0]]}, 400, "different depths"),
    "too deep": ({"pixel": _grid([1] * 5)}, 400, "got depth 5"),
    "out of range": ({"pixel": _grid([256])}, 400, "256 is out of range"),
    "negative": ({"pixel": _grid([-3])}, 400, "-3 is out of range"),
    "huge": ({"pixel": _grid([2**70])}, 400, "out of range"),
    "k beyond the codes": ({"pixel": _grid([1, 2]), "k": 3}, 400, "only 2 depths"),
    "k zero": ({"pixel": _grid([1]), "k": 0}, 422, ""),
    "floats": ({"pixel": _grid([1.5])}, 422, ""),
    "strings": ({"pixel": _grid(["a"])}, 422, ""),
    "missing": ({"k": 1}, 422, ""),
    "flat list": ({"pixel": [1, 2, 3]}, 422, ""),
}


@pytest.mark.parametrize("case", sorted(BAD_CODES))
def test_bad_codes_get_a_4xx_with_a_reason(client, case):
    body, status, message = BAD_CODES[case]
    response = client.post("/v1/decode", json=body)
    assert response.status_code == status
    if message:
        assert message in response.json()["detail"]


def test_unparsable_decode_bodies_get_a_4xx(client):
    json_type = {"content-type": "application/json"}
    assert client.post("/v1/decode", content=b"{not json", headers=json_type).status_code == 422
    nested = b'{"pixel":' + b"[" * 5000 + b"]" * 5000 + b"}"  # deeper than the JSON parser recurses
    assert client.post("/v1/decode", content=nested, headers=json_type).status_code == 400


def _async_client(app) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test")


def test_concurrent_requests_are_batched_and_match_sequential_results(tiny_tokenizer, photo_bytes):
    app = create_app(tiny_tokenizer, config=ServeConfig(max_batch=8, max_wait_ms=200))
    images = [encode_image(np.full((40, 40, 3), 30 * i, np.uint8)) for i in range(6)] + [photo_bytes]

    async def encode_all():
        async with _async_client(app) as client:
            return await asyncio.gather(*(client.post("/v1/encode", files=upload(data)) for data in images))

    responses = asyncio.run(encode_all())
    sizes = app.state.batchers["encode"].batch_sizes
    assert sum(size * count for size, count in sizes.items()) == len(images)
    assert max(sizes) > 1, f"no batch formed: {dict(sizes)}"
    for data, response in zip(images, responses):
        alone = tiny_tokenizer.encode(app.state.service.preprocess(data)[None]).pixel[0]
        assert torch.equal(torch.tensor(response.json()["pixel"]["codes"]), alone)


def test_a_full_queue_answers_503_then_recovers(tiny_tokenizer, photo_bytes):
    app = create_app(tiny_tokenizer, config=ServeConfig(max_batch=1, max_queue=1, max_wait_ms=0))
    lock = app.state.service.model_lock
    batcher = app.state.batchers["encode"]

    async def flood():
        async with _async_client(app) as client:

            def post() -> asyncio.Task:
                return asyncio.create_task(client.post("/v1/encode", files=upload(photo_bytes)))

            tasks = [post()]
            await _until(
                lambda: batcher.running == 1
            )  # the first request is in the model, blocked on the lock
            tasks += [post() for _ in range(4)]
            await _until(
                lambda: sum(task.done() for task in tasks) == 3
            )  # one waits in the queue, three refused
            health = (await client.get("/healthz")).json()
            assert health["pending"]["encode"] == 1 and health["running"]["encode"] == 1
            lock.release()
            return await asyncio.gather(*tasks)

    lock.acquire()
    responses = asyncio.run(flood())
    statuses = sorted(r.status_code for r in responses)
    assert statuses == [200, 200, 503, 503, 503]  # one in the model, one in the queue, the rest refused
    refused = next(r for r in responses if r.status_code == 503)
    assert "queue is full" in refused.json()["detail"] and refused.headers["retry-after"] == "1"
    assert batcher.pending == 0 and batcher.running == 0


async def _until(condition, timeout: float = 10.0) -> None:
    for _ in range(int(timeout / 0.01)):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition not reached in time")


def test_the_sample_photos_that_ship_are_served_for_the_page_and_offered_on_it(client):
    """The page is not blank before an upload: it offers scikit-image's photos, served pixel-exact."""
    import re

    from dualtoken.io import SAMPLE_PHOTOS, sample_photos

    for name, pixels in sample_photos():
        response = client.get(f"/static/samples/{name}.png")
        assert response.status_code == 200 and response.headers["content-type"] == "image/png"
        assert np.array_equal(png_pixels(response.content), pixels)
        assert client.post("/v1/reconstruct", files=upload(response.content, f"{name}.png")).status_code == 200
    for missing in ("dog.png", "coffee", "coffee.jpg", "__init__.png"):
        response = client.get(f"/static/samples/{missing}")
        assert response.status_code == 404 and "the samples: astronaut.png, coffee.png" in response.json()["detail"]
    assert client.get("/static/samples/..%2Fapp.js").status_code == 404  # a name, never a path
    page = client.get("/").text
    assert re.findall(r'data-sample="(\w+)"><img src="/static/samples/(\w+)\.png"', page) == [
        (name, name) for name in SAMPLE_PHOTOS
    ]
