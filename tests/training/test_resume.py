"""Stopping at step k and resuming equals an uninterrupted run to 2k (one process); checkpoints are atomic."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from dualtoken import DualTokenizer
from dualtoken.errors import CheckpointError
from dualtoken.training import checkpoints as ckpt
from dualtoken.training import tokenizer_engine

from .conftest import tiny_config, train_records


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return DualTokenizer.from_pretrained(folder).state_dict()


def test_resume_equals_uninterrupted_run(tmp_path: Path, train_images: Path):
    extra = ("max_steps=6", "loss.gan.restart_every=3")
    straight = tokenizer_engine(tiny_config(tmp_path / "a", train_images, *extra)).fit()
    first = tokenizer_engine(tiny_config(tmp_path / "b", train_images, *extra))
    assert first.fit(stop_at=3)["export"] is None  # interrupted: no final export yet
    second = tokenizer_engine(tiny_config(tmp_path / "b", train_images, *extra))
    assert second.step == 3 and second.resumed_from.name == "step-00000003.pt"
    resumed = second.fit()

    assert resumed["step"] == straight["step"] == 6
    losses_a = [r["loss"] for r in train_records(tmp_path / "a")]
    losses_b = [r["loss"] for r in train_records(tmp_path / "b")]
    assert [r["step"] for r in train_records(tmp_path / "b")] == list(range(1, 7))
    assert losses_b == pytest.approx(losses_a, rel=1e-5, abs=1e-6)
    assert "disc_hinge" in train_records(tmp_path / "b")[-1]  # the discriminator was trained and resumed
    a, b = _weights(Path(straight["export"])), _weights(Path(resumed["export"]))
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-5, atol=1e-6, msg=name)
    assert any("codebook" in name for name in a)
    assert not any(name.startswith("teacher") for name in a)  # the teacher is never saved with the model


def test_interrupted_write_keeps_last_good_checkpoint(tmp_path: Path, monkeypatch):
    folder = tmp_path / "ckpt"
    ckpt.save_checkpoint(folder, 1, {"step": 1, "value": torch.ones(3)}, keep_last=2)

    def crash(state, handle):
        handle.write(b"partial")
        raise KeyboardInterrupt  # the process is stopped mid-write

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        ckpt.save_checkpoint(folder, 2, {"step": 2}, keep_last=2)
    monkeypatch.undo()
    assert [p.name for p in folder.iterdir()] == ["step-00000001.pt"]
    path, state = ckpt.load_latest_checkpoint(folder)
    assert path.name == "step-00000001.pt" and torch.equal(state["value"], torch.ones(3))


def test_damaged_newest_checkpoint_is_skipped_and_old_ones_pruned(tmp_path: Path):
    folder = tmp_path / "ckpt"
    for step in (1, 2, 3):
        ckpt.save_checkpoint(folder, step, {"step": step}, keep_last=2)
    assert [p.name for p in ckpt.list_checkpoints(folder)] == ["step-00000002.pt", "step-00000003.pt"]
    ckpt.checkpoint_path(folder, 3).write_bytes(b"garbage")
    with pytest.warns(RuntimeWarning, match="damaged"):
        path, state = ckpt.load_latest_checkpoint(folder)
    assert state["step"] == 2
    with pytest.raises(CheckpointError):
        ckpt.read_checkpoint(ckpt.checkpoint_path(folder, 3))
