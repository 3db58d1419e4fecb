"""``dualtoken finetune``: the before/after lines, one error line and exit code 2 on bad input, exit 130 on Ctrl-C."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from dualtoken import DualTokenizer
from dualtoken.cli.main import main
from dualtoken.training.pixel import PixelTapTask

from ..training.conftest import write_images

FAST = ["--set", "train.max_steps=2", "--set", "train.data.batch_size=4", "--set", "train.cache.crops_per_image=1"]


@pytest.fixture
def photos(tmp_path: Path) -> Path:
    return write_images(tmp_path / "photos", 12)


def test_finetune_prints_the_psnr_before_and_after_and_exports(base_dir, photos, tmp_path, capsys):
    out = tmp_path / "out"
    code = main(["finetune", str(photos), "--out", str(out), "--model", str(base_dir), "--minutes", "1",
                 "--no-progress", *FAST])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert re.search(r"held-out PSNR before: \d+\.\d\d dB \(5 held out of .*photos, 64x64, dualtoken-tiny\)", captured.err)
    lines = captured.out.splitlines()
    assert re.fullmatch(r"trained 2 steps of 4 crops \(7 crops cut from 7 images\) in \d+ s, \d+ s all told", lines[0])
    assert re.fullmatch(
        r"held-out PSNR \(5 images, 64x64\): \d+\.\d\d -> \d+\.\d\d dB, [+-]\d+\.\d\d dB "
        r"\(95 % paired bootstrap interval [+-]\d+\.\d\d to [+-]\d+\.\d\d\)", lines[1]
    )
    assert lines[2] == "tower and semantic vocabulary: bit-identical to dualtoken-tiny"
    assert lines[3] == f"wrote {out} (DualTokenizer.from_pretrained({str(out)!r}))"
    assert DualTokenizer.from_pretrained(out).config.base_model == "dualtoken-tiny"


@pytest.mark.parametrize(
    "case, message",
    [
        ("empty", r"PHOTOS: no image files .* under .*empty"),
        ("file", r"PHOTOS .*img\d+\.png: not a folder"),
        ("missing", r"PHOTOS .*nowhere: no such folder"),
        ("minutes0", r"minutes must be > 0, got 0"),
        ("minutes-", r"minutes must be > 0, got -2"),
        ("few", r"has 6 images, too few to hold out 5 .* give at least 10, or held-out images with --eval FOLDER"),
        ("eval-same", r"--eval .* shares 12 images with"),
        ("out-file", r"--out .*img\d+\.png: a file is in the way"),
        ("bad-set", r"unknown key 'train.nothing'"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(case, message, base_dir, photos, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    few = write_images(tmp_path / "few", 6)
    image = next(photos.iterdir())
    args = {
        "empty": [str(tmp_path / "empty")],
        "file": [str(image)],
        "missing": [str(tmp_path / "nowhere")],
        "minutes0": [str(photos), "--minutes", "0"],
        "minutes-": [str(photos), "--minutes", "-2"],
        "few": [str(few)],
        "eval-same": [str(photos), "--eval", str(photos)],
        "out-file": [str(photos), "--out", str(image)],
        "bad-set": [str(photos), "--set", "train.nothing=1"],
    }[case]
    if "--out" not in args:
        args += ["--out", str(tmp_path / "out")]
    assert main(["finetune", *args, "--model", str(base_dir), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and err.startswith("dualtoken finetune: error: "), err
    assert re.search(message, err), err
    assert not (tmp_path / "out").exists()


def test_ctrl_c_exits_130_and_says_what_is_kept(base_dir, photos, tmp_path, capsys, monkeypatch):
    original, calls = PixelTapTask.loss, []

    def loss(self, model, batch):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return original(self, model, batch)

    monkeypatch.setattr(PixelTapTask, "loss", loss)
    out = tmp_path / "out"
    code = main(["finetune", str(photos), "--out", str(out), "--model", str(base_dir), "--minutes", "1",
                 "--no-progress", "--set", "export_every_minutes=1e-9", *FAST[2:], "--set", "train.max_steps=9"])
    err = capsys.readouterr().err.splitlines()
    assert code == 130
    assert err[-2:] == [f"interrupted at step 2: {out} holds the export of step 2", "dualtoken finetune: interrupted"]
    assert DualTokenizer.from_pretrained(out).config.name == "out"
