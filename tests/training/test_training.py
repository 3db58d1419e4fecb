"""Training runs: what must not change does not, corrupt images are skipped, everything is observable."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch

from dualtoken import DualTokenizer
from dualtoken.data import SkippedImageWarning
from dualtoken.training import tokenizer_engine
from dualtoken.training.distributed import unwrap

from .conftest import tiny_config, train_records, write_images


def _snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _changed(before: dict, after: dict) -> set[str]:
    return {k for k in before if not torch.equal(before[k], after[k])}


def test_teacher_gets_no_gradient_and_never_changes(tmp_path: Path, train_images: Path):
    trainer = tokenizer_engine(tiny_config(tmp_path / "run", train_images, "max_steps=3"))
    teacher_before = _snapshot(trainer.task.teacher)
    model_before = _snapshot(unwrap(trainer.model))
    trainer.fit()
    assert all(p.grad is None and not p.requires_grad for p in trainer.task.teacher.parameters())
    assert not _changed(teacher_before, _snapshot(trainer.task.teacher))
    assert trainer.task.teacher is not unwrap(trainer.model).backbone
    changed = _changed(model_before, _snapshot(unwrap(trainer.model)))
    assert any(k.startswith("backbone.") for k in changed)  # the student's tower did train
    assert "pixel.quantizer.codebook" in changed and "semantic.quantizer.codebook" in changed


@pytest.mark.parametrize("preset", ["stage2", "finetune"])
def test_what_a_preset_freezes_never_changes(tmp_path: Path, train_images: Path, preset: str):
    overrides = ["max_steps=3", f"freeze.preset={preset}"]
    if preset == "stage2":  # the release's stage-2 objective: no pixel terms, no GAN
        overrides += [
            "loss.pixel_mse=0",
            "loss.pixel_commitment=0",
            "loss.gan.enabled=false",
            "loss.token_mse=0",
        ]
    trainer = tokenizer_engine(tiny_config(tmp_path / "run", train_images, *overrides))
    tok = unwrap(trainer.model)
    frozen = set(trainer.task.frozen)
    before = _snapshot(tok)
    trainer.fit()
    changed = _changed(before, _snapshot(tok))
    assert frozen and not frozen & changed
    if preset == "stage2":
        assert "pixel.quantizer.codebook" not in changed and "semantic.quantizer.codebook" in changed
        assert not any(k.startswith("decoder.") for k in changed)
    assert any(k.startswith("backbone.") for k in changed)  # the unfrozen top of the tower trained


def test_corrupt_image_is_skipped_and_counted(tmp_path: Path):
    data = write_images(tmp_path / "data", 5)
    (data / "zz_truncated.png").write_bytes((data / "img000.png").read_bytes()[:60])
    (data / "zz_text.jpg").write_text("not an image")
    config = tiny_config(tmp_path / "run", data, "max_steps=4", "data.batch_size=3", "loss.gan.enabled=false")
    with pytest.warns(SkippedImageWarning):
        summary = tokenizer_engine(config).fit()
    assert summary["step"] == 4 and summary["metrics"]["skipped_images"] >= 2


def test_run_is_observable_and_exports_a_loadable_tokenizer(tmp_path: Path, train_images: Path):
    heldout = write_images(tmp_path / "heldout", 4, seed=9)
    config = tiny_config(
        tmp_path / "run",
        train_images,
        "max_steps=4",
        f"data.eval={heldout}",
        "data.eval_images=4",
        "log.eval_every=2",
        "log.grid_every=2",
        "log.grid_images=3",
        "log.tensorboard=true",
        "checkpoint.keep_last=1",
    )
    trainer = tokenizer_engine(config)
    summary = trainer.fit()
    out = tmp_path / "run"
    train = train_records(out)
    assert [r["step"] for r in train] == [1, 2, 3, 4]
    for name in ("loss", "pixel_mse", "token_cosine", "lr", "samples_per_s", "peak_memory_mb", "disc_hinge"):
        assert name in train[-1], name
    codebook = train_records(out, "codebook")[-1]
    assert 0 < codebook["pixel/usage"] <= 1 and codebook["semantic/depth3/perplexity"] >= 1
    heldout_records = train_records(out, "eval")
    assert [r["step"] for r in heldout_records] == [0, 2, 4] and heldout_records[-1]["psnr"] > 0
    grids = sorted((out / "grids").glob("*.png"))
    assert [g.name for g in grids] == ["step-00000002.png", "step-00000004.png"]
    assert list((out / "tensorboard").glob("events.*"))
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-00000004.pt"]
    assert json.loads((out / "train_config.json").read_text())["max_steps"] == 4
    exported = DualTokenizer.from_pretrained(summary["export"])
    for name, value in unwrap(trainer.model).state_dict().items():
        assert torch.equal(exported.state_dict()[name].cpu(), value.cpu()), name


@pytest.mark.slow
@pytest.mark.data
def test_loss_falls_and_heldout_psnr_rises_on_real_images(tmp_path: Path, shared_data: Path):
    images = sorted((shared_data / "imagenet_samples" / "images").glob("*.jpg"))
    even = [p for p in images if int(p.name[:4]) % 2 == 0]  # the train split of the README
    odd = [p for p in images if int(p.name[:4]) % 2 == 1]
    (tmp_path / "train.txt").write_text("\n".join(str(p) for p in even[:200]) + "\n")
    (tmp_path / "heldout.txt").write_text("\n".join(str(p) for p in odd[:16]) + "\n")
    config = tiny_config(
        tmp_path / "run",
        tmp_path / "train.txt",
        "max_steps=40",
        "data.batch_size=8",
        "optimizer.lr=0.002",
        "optimizer.warmup_steps=5",
        f"data.eval={tmp_path / 'heldout.txt'}",
        "data.eval_images=16",
        "log.eval_every=40",
        "loss.gan.enabled=false",
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SkippedImageWarning)
        tokenizer_engine(config).fit()
    heldout = train_records(tmp_path / "run", "eval")
    before, after = heldout[0]["psnr"], heldout[-1]["psnr"]
    losses = [r["loss"] for r in train_records(tmp_path / "run")]
    assert sum(losses[-5:]) / 5 < 0.8 * sum(losses[:5]) / 5
    assert after > before + 1.0, (before, after)


def test_gradient_accumulation_reads_micro_batches_per_step(tmp_path: Path, train_images: Path):
    config = tiny_config(
        tmp_path / "run", train_images, "max_steps=3", "grad_accum=3", "loss.gan.start_step=1"
    )
    trainer = tokenizer_engine(config)
    trainer.fit()
    assert trainer.task.loader.batches == 9  # 3 micro-batches for each of the 3 optimiser steps
    assert trainer.optimizer.state[next(iter(unwrap(trainer.model).parameters()))]["step"] == 3
    records = train_records(tmp_path / "run")
    assert records[-1]["samples_per_s"] > 0 and "disc_hinge" in records[-1]


def test_gradient_checkpointing_changes_nothing_but_memory(tmp_path: Path, train_images: Path):
    runs = {}
    for flag in ("false", "true"):
        config = tiny_config(tmp_path / flag, train_images, "max_steps=2", f"gradient_checkpointing={flag}")
        trainer = tokenizer_engine(config)
        trainer.fit()
        assert trainer.task.tokenizer.backbone.gradient_checkpointing is (flag == "true")
        runs[flag] = [r["loss"] for r in train_records(tmp_path / flag)]
    assert runs["true"] == pytest.approx(runs["false"], rel=1e-5)


@pytest.mark.parametrize("preset", ["stage1", "stage2"])
def test_single_vocabulary_model_trains(tmp_path: Path, train_images: Path, preset: str):
    extra = [
        'model_overrides=["pixel_quantizer=null","shortcut_layer=null"]',
        f"freeze.preset={preset}",
        "max_steps=2",
    ]
    if preset == "stage2":
        extra += ["loss.gan.enabled=false", "loss.pixel_mse=0", "loss.pixel_commitment=0"]
    summary = tokenizer_engine(tiny_config(tmp_path / "run", train_images, *extra)).fit()
    assert summary["step"] == 2 and summary["metrics"]["loss"] > 0
    assert train_records(tmp_path / "run", "codebook")[-1]["pixel/usage"] > 0
