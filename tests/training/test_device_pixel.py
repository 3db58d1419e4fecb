"""recipes/efflite0/device_pixel.py at tiny size on the CPU: pack, train for a wall-clock budget with the images
cropped on the device, and resume the result with the file-based trainer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from dualtoken import DualTokenizer
from dualtoken.training import load_train_config, tokenizer_engine

from .conftest import load_recipe_script, tiny_config, write_images

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def device_pixel():
    return load_recipe_script("device_pixel")


def test_the_recipe_is_the_pixel_branch_with_a_kmeans_start():
    config = load_train_config(ROOT / "recipes" / "efflite0" / "pixel.json")
    assert config.branch == "pixel" and config.codebook_init.method == "kmeans" and not config.loss.needs_teacher


def test_pack_train_and_resume_on_the_cpu(tmp_path: Path, device_pixel, monkeypatch):
    images = write_images(tmp_path / "photos", 6)
    kodak = write_images(tmp_path / "kodak", 3, seed=1, size=(80, 96))
    data = tmp_path / "device_data"
    device_pixel.main(["pack", "--list", str(images), "--kodak", str(kodak), "--out", str(data), "--short-side", "64",
                      "--kodak-size", "64", "--budget-mib", "1"])
    pack = json.loads((data / "pack.json").read_text())
    assert pack["count"] == 6 and pack["quality"] == 90 and pack["bytes"] <= 2**20
    assert sorted(p.name for p in (data / "kodak").iterdir()) == ["img000.png", "img001.png", "img002.png"]
    weights = next((data / "site").rglob("*.pth"))
    assert next(iter(torch.load(weights, weights_only=True).values())).dtype == torch.float16

    recipe = tmp_path / "tiny.json"
    pixel = tiny_config(tmp_path / "unused", images, "branch=pixel", "teacher=none", "loss.semantic_weight=0",
                        "freeze.preset=stage0", "loss.gan.enabled=false", "codebook_init.method=kmeans",
                        "data.eval_images=3")
    recipe.write_text(pixel.to_json())
    out = tmp_path / "OUT"
    monkeypatch.setattr(device_pixel, "PART_BYTES", 2**20)  # several parts at tiny size too
    device_pixel.main(["train", "--data", str(data), "--out", str(out), "--work", str(tmp_path / "work"),
                       "--config", str(recipe), "--device", "cpu", "--workers", "2", "--budget-seconds", "2",
                       "--set", "data.batch_size=2", "--set", "checkpoint.every=2", "--set", "log.eval_every=2",
                       "--set", "init_from=null"])  # the tiny model starts fresh; resume must rebuild the same
    summary = json.loads((out / "summary.json").read_text())
    assert summary["out_of_time"] and summary["step"] >= 1 and summary["images"] == 6
    used = json.loads((out / "train_config.json").read_text())
    assert used["optimizer"]["schedule"] == "constant" and used["data"]["batch_size"] == 2  # DEVICE_DEFAULTS, then --set
    assert used["init_from"] is None
    parts = sorted(out.glob("checkpoint.part*"))
    assert len(parts) >= 2 and all(p.stat().st_size <= 2**20 for p in parts)
    evals = [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if r["kind"] == "eval"]
    assert evals[0]["samples_seen"] == 0 and evals[-1]["step"] == summary["step"] and evals[-1]["psnr"] > 0

    run = tmp_path / "cpu-run"
    device_pixel.main(["resume", str(out), str(run), "--config", str(recipe)])
    exported = DualTokenizer.from_pretrained(run / "final")
    trained = DualTokenizer.from_pretrained(tmp_path / "work" / "final")
    for name, value in trained.state_dict().items():
        assert torch.equal(exported.state_dict()[name], value), name
    cpu = load_train_config(recipe, [f"output_dir={run}", f"max_steps={summary['step'] + 2}"])
    with pytest.warns(RuntimeWarning, match="restarting epoch"):
        trainer = tokenizer_engine(cpu)
    assert trainer.step == summary["step"]
    assert trainer.fit()["step"] == summary["step"] + 2
