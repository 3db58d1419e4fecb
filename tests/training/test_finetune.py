"""``dualtoken.training.finetune``: the split, the export (by path, named after its base, frozen weights bit for bit),
the before/after PSNR with its paired interval, and what an interrupt leaves."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dualtoken import DualTokenizer
from dualtoken.errors import ConfigError, DataError
from dualtoken.metrics import bootstrap_mean
from dualtoken.training import checkpoints
from dualtoken.training.finetune import (
    FinetuneConfig,
    finetune,
    load_finetune_config,
    per_image_psnr,
    split_images,
)
from dualtoken.training.pixel import PixelTapTask

from .conftest import write_images

FAST = ["train.max_steps=3", "train.log.progress=false", "train.data.batch_size=4", "train.cache.crops_per_image=1"]


@pytest.fixture
def photos(tmp_path: Path) -> Path:
    return write_images(tmp_path / "photos", 20)


def _config(*overrides: str) -> FinetuneConfig:
    return load_finetune_config([*FAST, *overrides], minutes=1.0)


def test_a_finetune_exports_a_model_that_loads_by_path_and_keeps_every_frozen_weight(base_dir, photos, tmp_path):
    lines: list[str] = []
    out = tmp_path / "my-photos"
    result = finetune(photos, out, _config(), model=str(base_dir), say=lines.append)

    model = DualTokenizer.from_pretrained(out)
    config = json.loads((out / "config.json").read_text())
    assert (config["name"], config["base_model"]) == ("my-photos", "dualtoken-tiny")
    card = (out / "README.md").read_text()
    assert "Fine-tuned from `dualtoken-tiny`." in card and "held-out PSNR after (dB)" in card
    before, after = load_file(str(base_dir / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert before.keys() == after.keys() and all(v.dtype == after[k].dtype for k, v in before.items())
    frozen = [k for k in before if not k.startswith(("pixel.", "pixel_shortcut.", "decoder."))]
    assert any(k.startswith("semantic.") for k in frozen) and any(k.startswith("backbone.") for k in frozen)
    assert all(torch.equal(before[k], after[k]) for k in frozen) and result.changed_outside_pixel_path == []
    for part in ("pixel.down.", "pixel.quantizer.codebook", "pixel.up.", "pixel_shortcut.", "decoder."):
        assert any(not torch.equal(v, after[k]) for k, v in before.items() if k.startswith(part)), part

    # the split: 20 images, a fifth held out; the figures are the per-image PSNRs of the base and of the export
    assert result.steps == 3 and result.train_images == 15 and len(result.heldout) == 5
    report = json.loads((out / "finetune.json").read_text())
    assert [Path(r["image"]).name for r in report["heldout"]] == [Path(i).name for i in result.heldout]
    images = torch.stack([_eval_image(Path(i)) for i in result.heldout])
    base = DualTokenizer.from_pretrained(base_dir)
    torch.testing.assert_close(result.psnr_before, per_image_psnr(base, images, 8))
    torch.testing.assert_close(result.psnr_after, per_image_psnr(model, images, 8))
    assert result.difference["mean"] == pytest.approx(float((result.psnr_after - result.psnr_before).mean()))
    assert result.difference["low"] <= result.difference["mean"] <= result.difference["high"]
    assert lines[0].startswith("held-out PSNR before: ")
    assert any("bit-identical to dualtoken-tiny" in line for line in result.summary_lines())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base", "my-photos", "photos"]  # no work folder left
    assert out.stat().st_mode & 0o777 == (tmp_path / "photos").stat().st_mode & 0o777  # not a temporary's 0700


def _eval_image(path: Path) -> torch.Tensor:
    from dualtoken.io import load_image

    return load_image(path, (64, 64))


def test_an_eval_folder_is_held_out_whole_and_photos_all_train(base_dir, photos, tmp_path):
    held = write_images(tmp_path / "held", 3, seed=1)
    split = split_images(photos, held, FinetuneConfig())
    assert len(split.train) == 20 and [p.name for p in split.heldout] == ["img000.png", "img001.png", "img002.png"]
    with pytest.raises(DataError, match="shares 20 images"):
        split_images(photos, photos, FinetuneConfig())


@pytest.mark.parametrize(
    "count, message",
    [(9, "too few to hold out 5 .* give at least 10"), (0, "no image files")],
)
def test_too_few_images_are_refused(tmp_path: Path, count: int, message: str):
    folder = write_images(tmp_path / "few", count) if count else tmp_path / "few"
    folder.mkdir(exist_ok=True)
    with pytest.raises(DataError, match=message):
        split_images(folder, None, FinetuneConfig())


@pytest.mark.parametrize(
    "values, message",
    [({"minutes": 0}, "minutes must be > 0"), ({"minutes": -1}, "minutes must be > 0"),
     ({"heldout_share": 1.0}, "heldout_share"), ({"min_heldout": 0}, "min_heldout")],
)
def test_bad_settings_are_refused(values, message):
    with pytest.raises(ConfigError, match=message):
        FinetuneConfig(**values)


def test_a_budget_that_leaves_no_time_to_train_is_refused_and_writes_nothing(base_dir, photos, tmp_path):
    with pytest.raises(ConfigError, match="0.05 minutes leave no time to train"):
        finetune(photos, tmp_path / "out", _config("minutes=0.05"), model=str(base_dir))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base", "photos"]


def test_the_recipe_must_stay_on_the_cached_pixel_path():
    with pytest.raises(ConfigError, match='train.branch must stay "pixel"'):
        load_finetune_config(["train.cache.pixel_tap=false"])


def test_the_paired_interval_resamples_images():
    same = bootstrap_mean(torch.full((50,), 0.3))
    assert (same["mean"], same["low"], same["high"], same["n"]) == pytest.approx((0.3, 0.3, 0.3, 50))
    noisy = bootstrap_mean(torch.linspace(-1.0, 1.0, 41) + 0.1)
    assert noisy["low"] < 0.1 < noisy["high"] and noisy["high"] - noisy["low"] < 0.7


def _interrupt_at(monkeypatch, call: int) -> None:
    """The ``call``-th training micro-step raises KeyboardInterrupt, as Ctrl-C would."""
    original, calls = PixelTapTask.loss, []

    def loss(self, model, batch):
        calls.append(1)
        if len(calls) == call:
            raise KeyboardInterrupt
        return original(self, model, batch)

    monkeypatch.setattr(PixelTapTask, "loss", loss)


def test_an_interrupt_keeps_the_last_whole_export(base_dir, photos, tmp_path, monkeypatch):
    _interrupt_at(monkeypatch, 4)
    lines: list[str] = []
    out = tmp_path / "ft"
    every_step = _config("train.max_steps=10", "export_every_minutes=1e-9")
    with pytest.raises(KeyboardInterrupt):
        finetune(photos, out, every_step, model=str(base_dir), say=lines.append)
    assert lines[-1] == f"interrupted at step 3: {out} holds the export of step 3"
    model = DualTokenizer.from_pretrained(out)  # whole, and by path
    assert model.config.base_model == "dualtoken-tiny" and not (out / "finetune.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base", "ft", "photos"]


def test_an_interrupt_before_any_export_leaves_the_folder_as_it_was(base_dir, photos, tmp_path, monkeypatch):
    out = tmp_path / "ft"
    finetune(photos, out, _config(), model=str(base_dir))
    first = {p.name: p.read_bytes() for p in out.iterdir()}
    _interrupt_at(monkeypatch, 2)
    lines: list[str] = []
    with pytest.raises(KeyboardInterrupt):
        finetune(photos, out, _config(), model=str(base_dir), say=lines.append)
    assert lines[-1] == f"interrupted at step 1: nothing exported yet; {out} is as it was"
    assert {p.name: p.read_bytes() for p in out.iterdir()} == first


def test_a_folder_replaced_while_interrupted_is_put_back(tmp_path, monkeypatch):
    old = tmp_path / "model"
    old.mkdir()
    (old / "config.json").write_text("old")
    new = checkpoints.folder_beside(old, "export")
    (new / "config.json").write_text("new")
    rename, calls = os.rename, []

    def interrupted_second_rename(src, dst):
        calls.append(src)
        if len(calls) == 2:
            raise KeyboardInterrupt
        rename(src, dst)

    monkeypatch.setattr(os, "rename", interrupted_second_rename)
    with pytest.raises(KeyboardInterrupt):
        checkpoints.replace_folder(new, old)
    assert (old / "config.json").read_text() == "old"
    monkeypatch.setattr(os, "rename", rename)
    checkpoints.replace_folder(new, old)
    assert (old / "config.json").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_a_convolutional_tower_trains_on_crops_of_crop_size_with_the_same_weights(tiny_tokenizer):
    from dualtoken.training.finetune import _training_model

    shipped = DualTokenizer.from_pretrained("dualtoken-efflite0")
    small = _training_model(shipped, 128)
    assert small.image_size == (128, 128) and shipped.image_size == (256, 256) and small.training
    assert all(torch.equal(v, small.state_dict()[k]) for k, v in shipped.state_dict().items())
    assert _training_model(tiny_tokenizer, 128).image_size == (64, 64)  # already smaller
    assert _training_model(tiny_tokenizer, 32).image_size == (64, 64)  # position embeddings: its own size
