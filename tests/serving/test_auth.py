"""The optional API key: every API route answers 401 without the right ``Authorization: Bearer`` header and 200 with
it; the page and the API reference stay open; without a key nothing changes; the OpenAPI document declares the
scheme; the page asks for the key once (in node, against a stand-in server); the CLI takes the key from
--api-key or $DUALTOKEN_API_KEY, refuses bad ones in one line, never prints it, and the load benchmark runs with
it without a failure."""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from importlib import resources
from pathlib import Path

import httpx
import pytest

from dualtoken.cli.main import main
from dualtoken.cli.serve import access_note, api_key
from dualtoken.errors import ConfigError
from dualtoken.serving import create_app

from .conftest import REPO

KEY = "s3cret-Key_0123456789"
BEARER = {"Authorization": f"Bearer {KEY}"}
APP_JS = Path(str(resources.files("dualtoken.serving") / "static" / "app.js"))
ROUTES = ["GET /healthz", "GET /v1/models", "POST /v1/encode", "POST /v1/decode", "POST /v1/reconstruct",
          "POST /v1/chat", "POST /v1/generate"]  # fmt: skip


def request(client, route: str, tiny_tokenizer, photo_bytes: bytes, headers: dict[str, str] | None = None):
    """A request ``route`` answers 200 to (given the key where one is needed)."""
    method, path = route.split()
    image = {"image": ("photo.png", photo_bytes, "image/png")}
    grid, depth = tiny_tokenizer.grid, tiny_tokenizer.pixel_depth
    bodies = {
        "/v1/encode": {"files": image},
        "/v1/reconstruct": {"files": image},
        "/v1/chat": {"files": image, "data": {"question": "What is this?"}},
        "/v1/decode": {"json": {"pixel": [[[0] * depth] * grid[1]] * grid[0]}},
        "/v1/generate": {"json": {"prompt": "Draw a parrot.", "cfg_scale": 1.0, "seed": 1}},
    }
    return client.request(method, path, headers=headers, **bodies.get(path, {}))


@pytest.fixture
def keyed_client(tiny_tokenizer, fake_mllm, serve_config):
    from fastapi.testclient import TestClient

    with TestClient(create_app(tiny_tokenizer, mllm=fake_mllm, config=serve_config, api_key=KEY)) as client:
        yield client


def test_the_routes_here_are_every_api_route(keyed_client):
    paths = keyed_client.get("/openapi.json").json()["paths"]
    assert {f"{method.upper()} {path}" for path, methods in paths.items() for method in methods} == set(ROUTES)


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize(
    "headers, wrong",
    [
        (None, False),
        ({"Authorization": "Bearer not-the-key"}, True),
        ({"Authorization": f"Bearer {KEY}x"}, True),  # the key with more after it
        ({"Authorization": f"Bearer {KEY[:-1]}"}, True),  # a prefix of the key
        ({"Authorization": f"Basic {KEY}"}, False),  # another scheme
        ({"Authorization": "Bearer "}, False),
        ({"X-Api-Key": KEY}, False),  # the key elsewhere than where the server looks
    ],
)
def test_every_api_route_refuses_a_request_without_the_key(
    keyed_client, tiny_tokenizer, photo_bytes, route, headers, wrong
):
    response = request(keyed_client, route, tiny_tokenizer, photo_bytes, headers)
    assert response.status_code == 401
    assert response.headers["content-type"] == "application/json"
    detail = response.json()["detail"]
    assert "Authorization: Bearer <key>" in detail and KEY not in detail
    challenge = response.headers["www-authenticate"]
    assert challenge.startswith("Bearer ") and ('error="invalid_token"' in challenge) == wrong


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("header", [f"Bearer {KEY}", f"bearer {KEY}", f"Bearer  {KEY} "])
def test_every_api_route_answers_with_the_key(keyed_client, tiny_tokenizer, photo_bytes, route, header):
    response = request(keyed_client, route, tiny_tokenizer, photo_bytes, {"Authorization": header})
    assert response.status_code == 200, response.text


def test_the_page_and_the_reference_need_no_key(keyed_client):
    for path in ("/", "/static/app.js", "/static/style.css", "/favicon.ico", "/docs", "/openapi.json",
                 "/static/samples/coffee.png"):  # the page's sample photos follow the page's rules
        assert keyed_client.get(path).status_code == 200, path
    assert 'id="key-form"' in keyed_client.get("/").text
    # any other path is the API's: an unknown one is refused too, so it shows nothing of what exists
    assert keyed_client.get("/v1/nothing-here").status_code == 401


def test_without_a_key_nothing_is_asked(client, tiny_tokenizer, photo_bytes):
    for route in ROUTES:
        assert request(client, route, tiny_tokenizer, photo_bytes).status_code == 200, route
    # a header sent anyway changes nothing
    assert request(client, "POST /v1/encode", tiny_tokenizer, photo_bytes, BEARER).status_code == 200
    openapi = client.get("/openapi.json").json()
    assert "security" not in openapi and "securitySchemes" not in openapi.get("components", {})
    assert all("401" not in op["responses"] for methods in openapi["paths"].values() for op in methods.values())
    assert "Authorization" not in client.get("/docs").text


def test_the_openapi_document_declares_the_bearer_scheme(keyed_client):
    openapi = keyed_client.get("/openapi.json").json()
    ((name, scheme),) = openapi["components"]["securitySchemes"].items()
    assert scheme["type"] == "http" and scheme["scheme"] == "bearer"
    assert openapi["security"] == [{name: []}]  # every operation
    refusals = [op["responses"]["401"] for methods in openapi["paths"].values() for op in methods.values()]
    error = {"$ref": "#/components/schemas/ErrorResponse"}
    assert len(refusals) == len(ROUTES) and all(r["content"]["application/json"]["schema"] == error for r in refusals)
    assert keyed_client.get("/openapi.json").json() == openapi  # amended once, not again on every request
    assert "Authorization: Bearer &lt;key&gt;" in keyed_client.get("/docs").text


def test_the_key_is_checked_before_the_body_is_read(keyed_client, serve_config):
    too_big = b"x" * (serve_config.max_body_bytes + 1)
    files = {"image": ("big.png", too_big, "image/png")}
    assert keyed_client.post("/v1/encode", files=files).status_code == 401
    assert keyed_client.post("/v1/encode", files=files, headers=BEARER).status_code == 413


@pytest.mark.parametrize("key", ["", "two words", "tab\there", "caf\u00e9", "new\nline"])
def test_a_key_that_cannot_travel_in_a_header_is_refused(tiny_tokenizer, key):
    with pytest.raises(ConfigError, match="api_key (is empty|has a space)") as raised:
        create_app(tiny_tokenizer, api_key=key)
    assert key == "" or key not in str(raised.value)


def args(flag: str | None) -> argparse.Namespace:
    return argparse.Namespace(api_key=flag)


def test_the_key_comes_from_the_flag_else_the_environment(monkeypatch):
    monkeypatch.delenv("DUALTOKEN_API_KEY", raising=False)
    assert api_key(args(None)) is None
    assert api_key(args("from-flag")) == "from-flag"
    monkeypatch.setenv("DUALTOKEN_API_KEY", "from-env")
    assert api_key(args(None)) == "from-env"
    assert api_key(args("from-flag")) == "from-flag"  # the flag wins


def test_the_note_for_other_machines_says_whether_a_key_is_required():
    assert access_note("127.0.0.1", None) is None and access_note("localhost", KEY) is None
    assert access_note("0.0.0.0", None).endswith("the API has no authentication (see --api-key)")
    assert access_note("0.0.0.0", KEY).endswith("the API requires the API key")
    assert KEY not in access_note("0.0.0.0", KEY)


@pytest.mark.parametrize(
    "argv, env, message",
    [
        (["--api-key", ""], None, "--api-key is empty"),
        (["--api-key", "my secret"], None, "--api-key has a space"),
        ([], "", "$DUALTOKEN_API_KEY is empty"),
        ([], "my secret", "$DUALTOKEN_API_KEY has a space"),
    ],
)
def test_a_bad_key_is_one_line_and_exit_2_without_loading(monkeypatch, capsys, argv, env, message):
    monkeypatch.delenv("DUALTOKEN_API_KEY", raising=False)
    if env is not None:
        monkeypatch.setenv("DUALTOKEN_API_KEY", env)
    # a model that does not exist: had the key been accepted, loading it would fail with another message
    assert main(["serve", "--model", "no/such-model", *argv]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and "secret" not in captured.err
    assert captured.err.strip().splitlines() == [
        f"dualtoken serve: error: {message}; expected a key of printable ASCII characters without spaces"
        if "empty" in message
        else f"dualtoken serve: error: {message}, a control or a non-ASCII character; expected printable ASCII "
        "without spaces"
    ]


@pytest.mark.skipif(shutil.which("node") is None, reason="node is not installed")
def test_the_page_asks_for_the_key_once_and_keeps_it(keyed_client):
    models = keyed_client.get("/v1/models", headers=BEARER).json()
    run = subprocess.run(
        ["node", str(Path(__file__).with_name("page_key_harness.js")), str(APP_JS)],
        input=json.dumps({"key": KEY, "models": models}), capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    shown = json.loads(run.stdout)
    # loading met the 401: the form is shown, and a second call made meanwhile waits instead of asking again
    assert shown["asked"] == {"shown": True, "note": "This server requires an API key.", "sent": 2}
    assert shown["refused"] == {
        "shown": True, "note": "The server refused that API key; enter it again.", "stored": None,
    }  # fmt: skip
    assert shown["accepted"]["shown"] is False and shown["accepted"]["secondStatus"] == 200
    assert shown["accepted"]["modelInfo"].startswith("dualtoken-tiny")
    assert shown["sent"][:6] == [
        ["/v1/models", None], ["/healthz", None],
        ["/v1/models", "Bearer wrong-key"], ["/healthz", "Bearer wrong-key"],
        ["/v1/models", f"Bearer {KEY}"], ["/healthz", f"Bearer {KEY}"],
    ]  # fmt: skip
    # later calls send the kept key (spaces typed around it trimmed) without asking; the field is cleared
    assert shown["later"] == 200 and shown["laterSent"] == [["/v1/models", f"Bearer {KEY}"]]
    assert shown["stored"] == KEY and shown["input"] == ""


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.slow
def test_the_command_takes_the_key_from_the_environment_and_never_prints_it():
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DUALTOKEN_API_KEY": KEY}
    argv = [sys.executable, "-m", "dualtoken", "serve", "--model", "dualtoken-tiny", "--random-weights",
            "--port", str(port), "--threads", "1", "--log-level", "debug"]  # fmt: skip
    process = subprocess.Popen(argv, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 240
        while True:
            assert process.poll() is None, process.stdout.read().decode()
            try:
                refused = httpx.get(f"{url}/v1/models", timeout=2)
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline, "the server did not come up"
                time.sleep(0.25)
        assert refused.status_code == 401
        assert httpx.get(f"{url}/v1/models", headers=BEARER).json()["models"][0]["name"] == "dualtoken-tiny"
        assert httpx.get(f"{url}/healthz", headers={"Authorization": f"Bearer {KEY}-wrong"}).status_code == 401
        assert httpx.get(f"{url}/").status_code == 200
    finally:
        process.terminate()
        output = process.communicate(timeout=20)[0].decode()
    assert "the API requires an API key (Authorization: Bearer <key>)" in output
    assert '"GET /v1/models HTTP/1.1" 401' in output and '"GET /v1/models HTTP/1.1" 200' in output  # access log
    assert KEY not in output


@pytest.mark.slow
def test_the_load_benchmark_runs_with_a_key_without_a_failure(photo_path):
    spec = importlib.util.spec_from_file_location("bench_serving", REPO / "benchmarks" / "bench_serving.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    import asyncio

    with bench.Server("dualtoken-tiny", 4, 5.0, 1, random_weights=True, api_key=KEY) as server:
        image = bench.photo_png(photo_path, (64, 64))
        for endpoint in ("encode", "reconstruct"):
            latencies, _, failures = asyncio.run(
                bench.load(server.url, f"/v1/{endpoint}", image, 4, 1.5, server.headers)
            )
            assert failures == 0 and len(latencies) >= 4, endpoint
            assert server.model_calls(endpoint) >= 1
        # the same load without the key: every request refused, none served
        latencies, _, failures = asyncio.run(bench.load(server.url, "/v1/encode", image, 2, 0.5))
        assert latencies == [] and failures > 0
