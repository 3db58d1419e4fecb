"""Helpers for the training tests: a folder of small smooth images and a tiny, fast training config."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import torch
from PIL import Image

from dualtoken.training import TrainConfig, load_train_config


def write_images(folder: Path, count: int, seed: int = 0, size: tuple[int, int] = (72, 80)) -> Path:
    """``count`` smooth random RGB PNGs (low-frequency noise, upsampled) of ``size`` (H, W)."""
    folder.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(seed)
    for index in range(count):
        low = torch.rand(1, 3, 6, 6, generator=generator)
        image = torch.nn.functional.interpolate(low, size=size, mode="bicubic", align_corners=False)[0]
        pixels = (image.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
        Image.fromarray(np.ascontiguousarray(pixels)).save(folder / f"img{index:03d}.png")
    return folder


@pytest.fixture
def train_images(tmp_path: Path) -> Path:
    return write_images(tmp_path / "train", 12)


def tiny_config(output_dir: Path, data_dir: Path, *overrides: str) -> TrainConfig:
    """dualtoken-tiny with a frozen copy of its initial tower as teacher; no perceptual net, small GAN at step 2."""
    base = [
        "model=dualtoken-tiny",
        "teacher=initial",
        f"output_dir={output_dir}",
        f"data.train={data_dir}",
        "max_steps=4",
        "data.batch_size=2",
        "optimizer.warmup_steps=1",
        "optimizer.lr=0.001",
        "disc_optimizer.warmup_steps=1",
        "disc_optimizer.lr=0.001",
        "disc_optimizer.min_lr=0.0",
        "loss.perceptual=0",
        "loss.perceptual_kind=none",
        "loss.gan.start_step=2",
        "loss.gan.discriminator.channels=[32,32,32,32]",
        "log.every=1",
        "log.codebook_every=2",
        "log.eval_every=0",
        "log.grid_every=0",
        "log.progress=false",
        "log.console=false",
        "log.tensorboard=false",
        "checkpoint.every=2",
    ]
    return load_train_config(None, base + list(overrides))


def train_records(output_dir: Path, kind: str = "train") -> list[dict]:
    lines = (Path(output_dir) / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


def initial_state(config: TrainConfig) -> dict[str, torch.Tensor]:
    """The weights a run of ``config`` starts from (train() seeds before it builds the model)."""
    from dualtoken.factory import build_tokenizer

    torch.manual_seed(config.seed)
    return build_tokenizer(config).state_dict()


def changed(before: dict, after: dict, prefix: str) -> bool:
    """Whether any weight whose name starts with ``prefix`` differs between two state dicts."""
    return any(not torch.equal(before[k], after[k]) for k in before if k.startswith(prefix))


def load_recipe_script(name: str) -> ModuleType:
    """A script of recipes/efflite0 (not a package) imported as a module, e.g. ``load_recipe_script("ablation")``."""
    path = Path(__file__).resolve().parents[2] / "recipes" / "efflite0" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the class is made
    spec.loader.exec_module(module)
    return module
