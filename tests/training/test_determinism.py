"""``deterministic: true``: two runs of a recipe, and a run killed with SIGKILL at a random moment after a
checkpoint and started again with the same command, export bitwise identical weights."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from .conftest import write_images

ROOT = Path(__file__).resolve().parents[2]
RECIPE = ROOT / "recipes" / "smoke-cpu-tiny.json"


def _command(out: Path, data: Path) -> list[str]:
    """The smoke recipe (deterministic: true) shortened: 8 steps, GAN from step 4, a checkpoint every 2 steps."""
    sets = [
        f"output_dir={out}", f"data.train={data}", f"data.eval={data}", "data.eval_images=2", "data.batch_size=2",
        "max_steps=8", "loss.gan.start_step=4", "loss.perceptual=0", "loss.perceptual_kind=none",
        "checkpoint.every=2", "log.every=1", "log.eval_every=4", "log.grid_every=0", "log.progress=false",
        "log.console=false", "log.tensorboard=false",
    ]
    return [sys.executable, "-m", "dualtoken", "train", "--config", str(RECIPE), *[a for s in sets for a in ("--set", s)]]


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT / "src")}


def _run(out: Path, data: Path) -> str:
    done = subprocess.run(_command(out, data), env=_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout + done.stderr


def _weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "final" / "model.safetensors"))


def _assert_identical(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    different = [name for name in a if not torch.equal(a[name], b[name])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_images(tmp_path_factory.mktemp("determinism") / "images", 8)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, data: Path) -> dict[str, torch.Tensor]:
    out = tmp_path_factory.mktemp("determinism") / "straight"
    _run(out, data)
    return _weights(out)


def test_the_smoke_recipe_is_deterministic():
    from dualtoken.training import load_train_config

    assert load_train_config(RECIPE).deterministic


def test_two_runs_export_identical_weights(tmp_path: Path, data: Path, uninterrupted):
    _run(tmp_path / "again", data)
    _assert_identical(uninterrupted, _weights(tmp_path / "again"))


@pytest.mark.slow
@pytest.mark.parametrize("trial", range(3))
def test_a_run_killed_after_a_checkpoint_and_restarted_exports_the_same_weights(
    tmp_path: Path, data: Path, uninterrupted, trial: int
):
    out = tmp_path / "killed"
    process = subprocess.Popen(_command(out, data), env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    first = 2 * (trial + 1)  # the checkpoint after which the kill comes: step 2, 4 or 6
    checkpoint = out / "checkpoints" / f"step-{first:08d}.pt"
    deadline = time.monotonic() + 300
    while not checkpoint.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    time.sleep(random.Random(trial).uniform(0.0, 0.1))  # somewhere in the next step (a tiny step takes ~0.1 s here)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert checkpoint.exists() and not (out / "final").exists(), "the run ended before it was killed"
    log = _run(out, data)
    resumed = [line for line in log.splitlines() if line.startswith("resuming from ")]
    assert len(resumed) == 1 and resumed[0].endswith(f"at step {int(resumed[0].split('step-')[1][:8])}")
    _assert_identical(uninterrupted, _weights(out))
