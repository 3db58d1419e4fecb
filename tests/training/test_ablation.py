"""recipes/efflite0/ablation.py end to end at tiny size: EfficientNet-Lite0 at 64 px, two steps per variant."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from dualtoken import DualTokenizer, get_config
from dualtoken.config import apply_overrides
from dualtoken.training import load_train_config

from .conftest import load_recipe_script, write_images


@pytest.fixture(scope="module")
def ablation():
    return load_recipe_script("ablation")


def _recipe(tmp_path: Path, images: Path) -> Path:
    recipe = {
        "model": "dualtoken-efflite0-256",
        "model_overrides": ["backbone.image_size=64", "decoder.resolution=64", "decoder.attn_resolutions=[4]"],
        "teacher": "pretrained",
        "device": "cpu",
        "data": {"train": str(images), "batch_size": 2},
        "optimizer": {"lr": 0.001, "warmup_steps": 1},
        "loss": {"perceptual": 0.0, "perceptual_kind": "none", "gan": {"enabled": False}},
        "freeze": {"preset": "stage0"},
        "checkpoint": {"every": 1, "keep_last": 1},
        "log": {"every": 1, "codebook_every": 1, "eval_every": 0, "grid_every": 0, "progress": False,
                "console": False, "tensorboard": False},
    }
    path = tmp_path / "recipe.json"
    path.write_text(json.dumps(recipe))
    return path


def test_the_single_codebook_spends_dualtokens_bits(ablation):
    model = get_config("dualtoken-efflite0-256")
    plan = ablation.variants(model)
    assert sorted(plan) == ["a_single_deep_both", "b_single_deep_recon", "c_single_shallow_recon", "d_dualtoken"]
    base = load_train_config(None, ["model=dualtoken-efflite0-256", "teacher=none", "loss.semantic_weight=0"])
    for name, overrides in plan.items():
        config = ablation.variant_config(base, overrides)
        assert ablation.bits_per_position(apply_overrides(model, config.model_overrides)) == 80, name
    shallow = apply_overrides(model, ablation.variant_config(base, plan["c_single_shallow_recon"]).model_overrides)
    assert shallow.semantic_layer == model.pixel_layer and shallow.pixel_quantizer is None


def test_bootstrap_interval_brackets_the_mean(ablation):
    values = torch.tensor([20.0, 21.0, 22.0, 23.0, 30.0])
    interval = ablation.bootstrap(values, 500)
    assert interval["mean"] == pytest.approx(23.2) and interval["low"] < 23.2 < interval["high"]
    assert ablation.bootstrap(torch.full((6,), 0.5), 100) == {"mean": 0.5, "low": 0.5, "high": 0.5, "n": 6}


def test_one_command_trains_scores_and_writes_the_table(tmp_path: Path, ablation):
    images = write_images(tmp_path / "train", 6)
    kodak = write_images(tmp_path / "kodak", 3, seed=1)
    heldout = write_images(tmp_path / "heldout", 3, seed=2)
    (heldout / "labels.tsv").write_text("file\tclass_index\n" + "".join(f"img{i:03d}.png\t{i}\n" for i in range(3)))
    out = tmp_path / "ablation"
    argv = ["--recipe", str(_recipe(tmp_path, images)), "--out", str(out), "--steps", "2", "--export-every", "1",
            "--kodak", str(kodak), "--heldout", str(heldout / "labels.tsv"), "--bootstrap", "200"]
    table = ablation.main(argv).read_text()
    rows = json.loads((out / "ablation.json").read_text())["rows"]
    assert [r["variant"] for r in rows] == ["a_single_deep_both", "b_single_deep_recon", "c_single_shallow_recon", "d_dualtoken"]
    for row in rows:
        assert row["step"] == 2 and row["bits"] == 80
        assert row["scores"]["psnr"]["n"] == 3 and row["scores"]["top1"]["n"] == 3
        assert row["scores"]["psnr"]["low"] <= row["scores"]["psnr"]["mean"] <= row["scores"]["psnr"]["high"]
    assert DualTokenizer.from_pretrained(out / "a_single_deep_both" / "export-00000002").config.pixel_quantizer is None
    assert table.count("\n| ") == 5 and "held-out top-1" in table
    # a second call trains nothing again and writes the same table
    stamp = (out / "d_dualtoken" / "summary.json").stat().st_mtime_ns
    assert ablation.main(argv).read_text() == table
    assert (out / "d_dualtoken" / "summary.json").stat().st_mtime_ns == stamp
