"""The engine's settings mean the same for every image task (the whole tokenizer, its pixel branch, its semantic
branch on cached features): grad_accum, export cadence, max_seconds, precision, the metric names, resume's line
and the refusal of an older checkpoint format. The MLLM task's are in tests/mllm/test_train.py."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from dualtoken.errors import CheckpointError, ConfigError
from dualtoken.precision import cpu_has_bf16_matmul
from dualtoken.training import checkpoints, tokenizer_engine, train

from .conftest import tiny_config, train_records

TASKS = {
    "tokenizer": (),
    "pixel": ("branch=pixel", "teacher=none", "loss.semantic_weight=0", "freeze.preset=stage0", "loss.gan.enabled=false"),
    "semantic": ("branch=semantic", "freeze.preset=stage0", "loss.pooled_kl=1.0", "cache.shard_images=6"),
}


def _config(task: str, out: Path, images: Path, *extra: str):
    return tiny_config(out, images, *TASKS[task], *extra)


@pytest.mark.parametrize("task", TASKS)
def test_grad_accum_and_export_cadence(task: str, tmp_path: Path, train_images: Path):
    engine = tokenizer_engine(_config(task, tmp_path / "run", train_images, "grad_accum=2", "checkpoint.export_every=2"))
    summary = engine.run()
    assert engine.task.data.batches == 8  # 2 micro-batches for each of the 4 optimiser steps
    assert engine.optimizer.state[next(p for p in engine.model.parameters() if p.requires_grad)]["step"] == 4
    assert sorted(p.name for p in (tmp_path / "run").glob("export-*")) == ["export-00000002", "export-00000004"]
    assert summary["export"] and summary["step"] == 4
    record = train_records(tmp_path / "run")[-1]
    for name in ("loss", "lr", "grad_norm", "samples_per_s", "peak_memory_mb", "epoch"):
        assert name in record, name
    assert "total" not in record and "images_per_s" not in record
    assert "semantic/depth0/usage" in train_records(tmp_path / "run", "codebook")[-1] or task == "pixel"


@pytest.mark.parametrize("task", TASKS)
def test_max_seconds_ends_the_run_with_a_checkpoint_and_an_export(task: str, tmp_path: Path, train_images: Path):
    summary = train(_config(task, tmp_path / "run", train_images, "max_steps=100", "max_seconds=0.001"))
    assert summary["out_of_time"] and summary["step"] == 1
    assert Path(summary["checkpoint"]).is_file() and (Path(summary["export"]) / "model.safetensors").is_file()


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.skipif(not cpu_has_bf16_matmul(), reason="this CPU has no bf16 matrix units")
def test_bf16_precision_trains_every_task(task: str, tmp_path: Path, train_images: Path):
    engine = tokenizer_engine(_config(task, tmp_path / "run", train_images, "precision=bf16", "max_steps=1"))
    assert engine.autocast_dtype == torch.bfloat16
    summary = engine.run()
    assert summary["step"] == 1 and torch.isfinite(torch.tensor(summary["metrics"]["loss"]))


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.skipif(cpu_has_bf16_matmul(), reason="checks the refusal on a CPU without bf16 matrix units")
def test_bf16_precision_is_refused_alike_for_every_task_on_this_cpu(task: str, tmp_path: Path, train_images: Path):
    with pytest.raises(ConfigError, match="precision bf16 needs a CPU with bf16 matrix units"):
        tokenizer_engine(_config(task, tmp_path / "run", train_images, "precision=bf16", "device=cpu"))
    assert tokenizer_engine(_config(task, tmp_path / "fp32", train_images, "precision=fp32")).autocast_dtype is None


def test_a_restart_says_where_it_resumes(tmp_path: Path, train_images: Path, capsys):
    config = _config("pixel", tmp_path / "run", train_images)
    train(config, stop_at=2)
    capsys.readouterr()
    engine = tokenizer_engine(config)
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("resuming")]
    assert lines == [f"resuming from {tmp_path / 'run' / 'checkpoints' / 'step-00000002.pt'} at step 2"]
    assert engine.run()["step"] == 4


def test_a_checkpoint_of_the_former_format_is_refused_in_one_line(tmp_path: Path, train_images: Path):
    config = _config("pixel", tmp_path / "run", train_images)
    checkpoints.save_checkpoint(tmp_path / "run" / "checkpoints", 2, {"format": 1, "step": 2}, keep_last=1)
    with pytest.raises(CheckpointError, match="predates") as refused:
        tokenizer_engine(config)
    assert len(str(refused.value).splitlines()) == 1


def test_another_tasks_checkpoint_is_refused(tmp_path: Path, train_images: Path):
    train(_config("pixel", tmp_path / "run", train_images), stop_at=2)
    with pytest.raises(CheckpointError, match="another task"):
        tokenizer_engine(_config("tokenizer", tmp_path / "run", train_images, "freeze.preset=stage0"))
