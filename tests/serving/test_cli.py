"""``dualtoken serve``: config from file, --set and flags; bad config exits 2; the real command serves."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import httpx
import pytest

from dualtoken.cli.main import build_parser, main
from dualtoken.cli.serve import serve_config
from dualtoken.errors import ConfigError

from .conftest import REPO


def parse(*argv: str):
    return build_parser().parse_args(["serve", *argv])


def test_defaults_bind_loopback():
    config = serve_config(parse())
    assert config.host == "127.0.0.1" and config.port == 8000 and config.max_batch > 1


def test_file_then_set_then_flags(tmp_path):
    path = tmp_path / "serve.json"
    path.write_text(json.dumps({"max_batch": 4, "max_queue": 9, "max_wait_ms": 1.5}))
    config = serve_config(
        parse("--config", str(path), "--set", "max_queue=3", "--set", "top_codes=5", "--max-batch", "1")
    )
    assert (config.max_batch, config.max_queue, config.max_wait_ms, config.top_codes) == (1, 3, 1.5, 5)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--set", "bogus=1"], "unknown key 'bogus'"),
        (["--set", "max_batch=0"], "max_batch must be >= 1"),  # the flags: at parse time (tests/cli/test_options.py)
        (["--set", "port=70000"], "port must be in 1..65535"),
        (["--config", "/nonexistent/serve.json"], "not found"),
    ],
)
def test_bad_settings_raise_config_error(argv, message):
    with pytest.raises(ConfigError, match=message):
        serve_config(parse(*argv))


def test_bad_settings_exit_2_with_one_line(capsys, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    assert main(["serve", "--config", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("dualtoken serve: error: --config") and "not valid JSON" in err and "\n" not in err


def test_a_port_in_use_is_one_line_and_exit_2_without_a_banner(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run(
            [sys.executable, "-m", "dualtoken", "serve", "--port", str(port)],
            capture_output=True, text=True, cwd=tmp_path, timeout=120,
        )
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.strip().splitlines() == [
        f"dualtoken serve: error: cannot listen on 127.0.0.1:{port}: Address already in use; choose another --port"
    ]


@pytest.mark.slow
def test_the_command_serves_on_loopback():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    argv = [sys.executable, "-m", "dualtoken", "serve", "--model", "dualtoken-tiny", "--random-weights", "--port", str(port)]
    process = subprocess.Popen(
        [*argv, "--threads", "1", "--log-level", "warning"],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 240
        while True:
            assert process.poll() is None, process.stdout.read().decode()
            try:
                health = httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2)
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline, "the server did not come up"
                time.sleep(0.25)
        assert health.json()["model"] == "dualtoken-tiny"
        banner = next(line for line in iter(process.stdout.readline, b"") if line.startswith(b"dualtoken serve:"))
        assert banner.decode().startswith(
            f"dualtoken serve: model dualtoken-tiny (random weights) with the MLLM dualtoken-mllm-cifar10 on "
            f"http://127.0.0.1:{port}/")
        assert httpx.get(f"http://127.0.0.1:{port}/").text.count('id="depth-slider"') == 1
        # the shipped MLLM is served by default: the page's ask / draw panel has a model behind it
        assert httpx.get(f"http://127.0.0.1:{port}/v1/models").json()["mllm"] is True
        drawn = httpx.post(f"http://127.0.0.1:{port}/v1/generate", json={"prompt": "Draw a horse."}, timeout=60)
        assert drawn.status_code == 200 and drawn.content.startswith(b"\x89PNG")
    finally:
        process.terminate()
        process.wait(20)


def test_serve_config_round_trips_through_json_and_rejects_unknown_keys():
    from dualtoken.config import from_dict, to_dict
    from dualtoken.serving import ServeConfig

    config = ServeConfig(max_batch=3, allowed_formats=("PNG",), torch_threads=2)
    assert from_dict(ServeConfig, json.loads(json.dumps(to_dict(config)))) == config
    with pytest.raises(ConfigError, match="unknown key"):
        from_dict(ServeConfig, {"max_batch": 2, "batch": 3})
    with pytest.raises(ConfigError, match="allowed_formats"):
        ServeConfig(allowed_formats=())


def test_the_banner_names_the_model_its_base_and_folder_not_only_the_folder(tiny_tokenizer, tmp_path):
    """`serve --model $M/tokenizer --mllm $M`: the folder's name `tokenizer` alone does not say which model runs."""
    from dualtoken import DualTokenizer
    from dualtoken.cli.serve import served_models

    base = tiny_tokenizer.save_pretrained(tmp_path / "base")
    inside = DualTokenizer.from_pretrained(base).save_pretrained(tmp_path / "M" / "tokenizer")  # as an MLLM saves it
    served = served_models(DualTokenizer.from_pretrained(inside), str(tmp_path / "M"))
    assert served == (f"model tokenizer (base model dualtoken-tiny, loaded from {inside.resolve()}) "
                      f"with the MLLM in {(tmp_path / 'M').resolve()}")
    assert served_models(DualTokenizer.from_pretrained("dualtoken-efflite0"), None) == "model dualtoken-efflite0"
    shipped = served_models(DualTokenizer.from_pretrained("dualtoken-efflite0"), "dualtoken-mllm-cifar10")
    assert shipped == "model dualtoken-efflite0 with the MLLM dualtoken-mllm-cifar10"  # a name, not a path
