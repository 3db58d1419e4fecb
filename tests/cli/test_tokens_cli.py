import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from dualtoken.cli.main import main
from dualtoken.tokenfile import load_tokens


@pytest.fixture
def photos(tmp_path):
    folder = tmp_path / "photos" / "nested"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (70 + i, 90, 3), dtype=np.uint8)).save(folder / f"p{i}.png")
    return tmp_path / "photos"


@pytest.fixture
def model_dir(tiny_tokenizer, tmp_path):
    return tiny_tokenizer.save_pretrained(tmp_path / "model")


def test_encode_decode_reconstruct_info(photos, model_dir, tmp_path, capsys):
    assert main(["encode", str(photos), "--model", str(model_dir), "--out", str(tmp_path / "t.safetensors")]) == 0
    tokens = load_tokens(tmp_path / "t.safetensors")
    assert tokens.pixel.shape == (3, 8, 8, 4) and tokens.semantic.shape == (3, 8, 8, 4)
    assert [p.rsplit("/", 1)[-1] for p in tokens.ids] == ["p0.png", "p1.png", "p2.png"]
    assert main(["decode", str(tmp_path / "t.safetensors"), "--model", str(model_dir), "--out", str(tmp_path / "dec"), "--depth", "2"]) == 0
    assert len(list((tmp_path / "dec").glob("*.png"))) == 3
    assert main(["reconstruct", str(photos), "--model", str(model_dir), "--out", str(tmp_path / "rec")]) == 0
    metrics = json.loads((tmp_path / "rec" / "metrics.json").read_text())
    rows = metrics["images"]
    assert len(rows) == 3 and all(r["psnr"] > 0 for r in rows)
    assert metrics["mean"]["psnr"] == pytest.approx(sum(r["psnr"] for r in rows) / 3, abs=1e-4)
    assert Image.open(tmp_path / "rec" / "p0_reconstruction.png").size == (64 * 2 + 4, 64)
    assert Image.open(tmp_path / "rec" / "p0_tokens.png").size[0] > 4 * 64  # four labelled depth columns
    assert main(["info", "--model", str(model_dir)]) == 0
    assert "8x8 positions x (4 pixel + 4 semantic codes)" in capsys.readouterr().out


@pytest.mark.parametrize(
    "args, message",
    [
        (["encode", "missing_dir", "--out", "x.safetensors"], "no such file or folder"),
        (["decode", "missing.safetensors", "--out", "o"], "token file not found"),
        (["info", "--model", "dualtoken-nope"], "neither a model folder"),
        (["convert-reference", "--config", "none.json", "--weights", "w", "--siglip", "s", "--out", "o"], "not found"),
    ],
)
def test_bad_input_prints_one_line_and_exits_2(args, message, tmp_path):
    result = subprocess.run([sys.executable, "-m", "dualtoken", *args], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert result.returncode == 2
    lines = [line for line in result.stderr.strip().splitlines() if not line.startswith("note:")]
    assert len(lines) == 1 and message in lines[0] and "Traceback" not in result.stderr


def test_corrupt_image_and_bad_depth(tmp_path, model_dir, capsys):
    (tmp_path / "bad.png").write_bytes(b"\x89PNG garbage")
    assert main(["encode", str(tmp_path / "bad.png"), "--model", str(model_dir), "--out", str(tmp_path / "t.safetensors")]) == 2
    Image.new("RGB", (64, 64)).save(tmp_path / "ok.png")
    assert main(["reconstruct", str(tmp_path / "ok.png"), "--model", str(model_dir), "--out", str(tmp_path / "r"), "--depth", "9"]) == 2
    assert "--depth must be in 1..4" in capsys.readouterr().err


def test_demo_and_reconstruct_write_one_metrics_shape(photos, model_dir, tmp_path):
    assert main(["reconstruct", str(photos), "--model", str(model_dir), "--out", str(tmp_path / "rec")]) == 0
    assert main(["demo", str(photos), "--model", str(model_dir), "--out", str(tmp_path / "demo")]) == 0
    reconstruct = json.loads((tmp_path / "rec" / "metrics.json").read_text())
    demo = json.loads((tmp_path / "demo" / "metrics.json").read_text())
    assert set(reconstruct) == set(demo) == {"model", "tokens_per_image", "images", "mean"}
    assert set(reconstruct["images"][0]) == set(demo["images"][0]) == {"image", "psnr", "ssim", "pixel_depths"}
    assert reconstruct["mean"] == demo["mean"]  # the same model on the same photos
