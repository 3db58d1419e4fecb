import json
import re
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
        (["decode", "missing.safetensors", "--out", "o"], "token file not found"),
        (["info", "--model", "dualtoken-nope"], "not a registered name"),
        (["info", "--model", "dualtoken-tiny"], "architecture without trained weights"),
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
    assert f"error: {tmp_path / 'bad.png'}: not a readable image" in capsys.readouterr().err
    Image.new("RGB", (64, 64)).save(tmp_path / "ok.png")
    assert main(["reconstruct", str(tmp_path / "ok.png"), "--model", str(model_dir), "--out", str(tmp_path / "r"), "--depth", "9"]) == 2
    assert "--depth must be in 1..4" in capsys.readouterr().err


def test_demo_and_reconstruct_write_one_metrics_shape(photos, model_dir, tmp_path):
    assert main(["reconstruct", str(photos), "--model", str(model_dir), "--out", str(tmp_path / "rec")]) == 0
    assert main(["demo", str(photos), "--model", str(model_dir), "--out", str(tmp_path / "demo")]) == 0
    reconstruct = json.loads((tmp_path / "rec" / "metrics.json").read_text())
    demo = json.loads((tmp_path / "demo" / "metrics.json").read_text())
    assert set(reconstruct) == set(demo) == {"model", "base_model", "tokens_per_image", "images", "mean"}
    assert set(reconstruct["images"][0]) == set(demo["images"][0]) == {"image", "psnr", "ssim", "pixel_depths"}
    assert reconstruct["mean"] == demo["mean"]  # the same model on the same photos


def test_without_a_model_the_commands_use_the_trained_default(capsys):
    assert main(["info"]) == 0
    assert capsys.readouterr().out.startswith("model: dualtoken-efflite0\n")
    assert main(["info", "--model", "dualtoken-tiny", "--random-weights"]) == 0
    assert capsys.readouterr().out.startswith("model: dualtoken-tiny\n")


def test_info_prints_its_summary_and_the_config_only_when_asked(model_dir, capsys):
    assert main(["info", "--model", str(model_dir)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "model: dualtoken-tiny" and lines[1] == "input: 64x64 RGB in [-1, 1]"
    assert lines[-1].startswith("parameters, total: ") and len(lines) <= 10
    assert not any(line.lstrip().startswith(("{", '"')) for line in lines)  # no JSON in the summary
    assert main(["info", "--model", str(model_dir), "--json"]) == 0
    config = json.loads(capsys.readouterr().out)  # the config alone: it parses as JSON
    assert config["name"] == "dualtoken-tiny" and config["backbone"]["image_size"] == 64


@pytest.mark.parametrize("out", ["t.bin", "tokens", "t.safetensors.tmp"])
def test_encode_to_neither_a_token_file_nor_a_folder_is_one_line_naming_both(out, photos, tmp_path):
    result = _run(["encode", str(photos), "--model", "dualtoken-tiny", "--random-weights", "--out", out], tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"dualtoken encode: error: --out {out}: expected FILE.safetensors (one token file) or a folder for sharded "
        f"output (an existing folder, or a path ending in /: --out {out}/)"
    ]
    assert not (tmp_path / out).exists() and result.stdout == ""


def test_info_lists_the_names_by_kind(capsys):
    assert main(["info", "--list"]) == 0
    rows = dict(line.split("\t") for line in capsys.readouterr().out.strip().splitlines())
    assert rows["dualtoken-efflite0"] == "trained model"
    assert rows["dualtoken-tiny"] == "architecture without trained weights"


def _two_folders(photos, tmp_path):
    second = tmp_path / "more"
    second.mkdir()
    Image.new("RGB", (80, 64), (200, 30, 30)).save(second / "red.png")
    return [str(photos), str(second)]


def test_every_input_is_encoded_in_both_modes_and_decode_reads_folders(photos, model_dir, tmp_path, capsys):
    inputs = _two_folders(photos, tmp_path)
    assert main(["encode", *inputs, "--model", str(model_dir), "--out", str(tmp_path / "t.safetensors")]) == 0
    assert len(load_tokens(tmp_path / "t.safetensors").ids) == 4
    assert main(["encode", *inputs, "--model", str(model_dir), "--out", f"{tmp_path / 'td'}/", "--shard-size", "3"]) == 0
    manifest = json.loads((tmp_path / "td" / "manifest.json").read_text())
    assert manifest["images"] == 4 and len(manifest["files"]) == 2
    capsys.readouterr()
    # no --model: the model recorded in the token files (the folder it was loaded from)
    assert main(["decode", str(tmp_path / "td"), "--out", str(tmp_path / "pngs")]) == 0
    assert len(list((tmp_path / "pngs").glob("*.png"))) == 4
    assert main(["decode", str(tmp_path / "t.safetensors"), "--out", str(tmp_path / "pngs2")]) == 0
    assert sorted(p.name for p in (tmp_path / "pngs2").glob("*.png"))[-1] == "000003_red.png"


def test_tokens_of_random_weights_say_how_to_decode_them(photos, tmp_path, capsys):
    out = tmp_path / "t.safetensors"
    assert main(["encode", str(photos), "--model", "dualtoken-tiny", "--random-weights", "--out", str(out)]) == 0
    assert main(["decode", str(out), "--out", str(tmp_path / "d")]) == 2
    assert "--model dualtoken-tiny --random-weights" in capsys.readouterr().err
    assert main(["decode", str(out), "--model", "dualtoken-tiny", "--random-weights", "--out", str(tmp_path / "d")]) == 0


@pytest.mark.parametrize("output", ["t.safetensors", "td/"])
def test_bad_files_are_skipped_named_counted_without_python_warnings(photos, model_dir, tmp_path, output):
    (tmp_path / "note.txt").write_text("not an image")
    args = ["encode", str(photos), str(tmp_path / "note.txt"), str(tmp_path / "gone.png"),
            "--model", str(model_dir), "--out", f"{tmp_path}/{output}"]
    result = subprocess.run([sys.executable, "-m", "dualtoken", *args], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    lines = [line for line in re.split(r"[\r\n]", result.stderr)
             if line.strip() and "%|" not in line and not line.startswith("note:")]  # no bars, no notes
    assert f"skipped unreadable input {tmp_path / 'gone.png'}: no such file or folder" in lines
    assert any(line.startswith(f"skipped unreadable input {tmp_path / 'note.txt'}: not a readable image")
               for line in lines)
    assert lines[-1] == "dualtoken encode: skipped 2 unreadable inputs" and len(lines) == 3
    assert "Warning" not in result.stderr and "warnings.warn" not in result.stderr

    strict = subprocess.run([sys.executable, "-m", "dualtoken", *args, "--strict"], capture_output=True, text=True,
                            timeout=120)
    assert strict.returncode == 2
    assert [line for line in strict.stderr.splitlines() if "error" in line] == [
        line for line in strict.stderr.splitlines() if line.startswith("dualtoken encode: error: unreadable input")
    ] != []


def test_reconstruct_skips_a_bad_file_and_fails_only_when_nothing_was_readable(photos, model_dir, tmp_path, capsys):
    (tmp_path / "note.txt").write_text("not an image")
    args = ["--model", str(model_dir), "--out", str(tmp_path / "r")]
    assert main(["reconstruct", str(photos), str(tmp_path / "note.txt"), *args]) == 0
    assert len(json.loads((tmp_path / "r" / "metrics.json").read_text())["images"]) == 3
    capsys.readouterr()
    assert main(["reconstruct", str(tmp_path / "note.txt"), str(tmp_path / "gone.png"), *args]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[-1].startswith("dualtoken reconstruct: error: no readable image among the 2 inputs")
    assert lines[-1].endswith("(skipped 2 unreadable inputs)") and len(lines) == 3  # two per-file lines, one summary


def _run(args, cwd, shell=False):
    command = f"{sys.executable} -m dualtoken {args}" if shell else [sys.executable, "-m", "dualtoken", *args]
    return subprocess.run(command, capture_output=True, text=True, cwd=cwd, timeout=120, shell=shell)


@pytest.mark.parametrize("bad", ["photo_typo.jpg", "folder_typo/", "corrupt.png", "empty_folder"])
def test_a_single_unreadable_input_is_one_error_line(bad, model_dir, tmp_path):
    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG garbage")
    (tmp_path / "empty_folder").mkdir()
    result = _run(["reconstruct", bad, "--model", str(model_dir), "--out", "r"], tmp_path)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"dualtoken reconstruct: error: {bad.rstrip('/')}"), lines


def test_a_closed_pipe_ends_quietly(tmp_path):
    result = _run("info --list | head -1", tmp_path, shell=True)
    assert result.stdout.count("\n") == 1 and result.stderr == "", result.stderr


def test_encode_prints_a_sentence_for_both_outputs(photos, model_dir, tmp_path, capsys):
    assert main(["encode", str(photos), "--model", str(model_dir), "--out", f"{tmp_path / 'td'}/"]) == 0
    assert capsys.readouterr().out.strip() == f"wrote {tmp_path / 'td'}: 3 images in 1 token file; 0 skipped"
    assert main(["encode", str(photos), "--model", str(model_dir), "--out", str(tmp_path / "td")]) == 0  # it exists
    assert capsys.readouterr().out.strip().endswith("in 1 token file, 1 of them already there; 0 skipped")
    one = str(next(photos.rglob("p0.png")))
    assert main(["encode", one, "--model", str(model_dir), "--out", str(tmp_path / "t.safetensors")]) == 0
    assert capsys.readouterr().out.startswith(f"wrote {tmp_path / 't.safetensors'}: 1 image x (8x8 positions")


def test_a_tiny_image_is_named_in_one_warning_line(model_dir, tmp_path):
    Image.new("RGB", (40, 30), (200, 30, 30)).save(tmp_path / "tiny.png")  # 64 px model: 2.1x
    Image.new("RGB", (40, 64), (30, 30, 200)).save(tmp_path / "narrow.png")  # 1.6x: no warning
    result = _run(["reconstruct", "tiny.png", "narrow.png", "--model", str(model_dir), "--out", "r"], tmp_path)
    assert result.returncode == 0, result.stderr
    warnings = [line for line in re.split(r"[\r\n]", result.stderr) if "warning" in line]
    assert len(warnings) == 1 and "tiny.png (40x30) upscaled 2.1x to 64x64" in warnings[0]
    help_text = _run(["reconstruct", "--help"], tmp_path).stdout
    assert "centre-cropped" in help_text and "2x" in help_text
