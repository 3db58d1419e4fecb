"""Every shipped recipe parses and validates; the CPU smoke recipe runs through the CLI (shortened)."""

from __future__ import annotations

from pathlib import Path

import pytest

from dualtoken.cli.main import main
from dualtoken.training import load_train_config

from .conftest import train_records, write_images

RECIPES = sorted((Path(__file__).resolve().parents[2] / "recipes").glob("*.json"))


def test_recipes_are_shipped():
    names = {p.stem for p in RECIPES}
    assert {"paper-stage1-so400m-384-rvq8", "smoke-cpu-tiny"} <= names


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
def test_recipe_validates(recipe: Path):
    config = load_train_config(recipe)
    assert config.max_steps >= 1 and config.data.train


def test_paper_recipe_has_the_release_hyperparameters():
    config = load_train_config(RECIPES[[p.stem for p in RECIPES].index("paper-stage1-so400m-384-rvq8")])
    assert (config.optimizer.lr, config.optimizer.betas, config.optimizer.weight_decay) == (
        7.2e-5,
        (0.5, 0.9),
        1e-4,
    )
    assert config.optimizer.warmup_steps == 10000 and config.data.batch_size == 32
    assert config.max_steps * config.data.batch_size * 8 == pytest.approx(20 * 10_000_000, rel=1e-4)
    assert config.loss.perceptual_kind == "lpips_vgg16" and config.loss.gan.disc_loss_weight == 0.75


def test_cli_trains_the_smoke_recipe_shortened(tmp_path: Path, capsys):
    data = write_images(tmp_path / "data", 6)
    recipe = RECIPES[[p.stem for p in RECIPES].index("smoke-cpu-tiny")]
    args = [
        "train",
        "--config",
        str(recipe),
        "--set",
        f"output_dir={tmp_path / 'run'}",
        "--set",
        f"data.train={data}",
        "--set",
        f"data.eval={data}",
        "--set",
        "max_steps=3",
        "--set",
        "data.batch_size=2",
        "--set",
        "data.num_workers=0",
        "--set",
        "loss.perceptual_kind=none",
        "--set",
        "loss.perceptual=0",
        "--set",
        "log.progress=false",
        "--set",
        "log.console=false",
    ]
    assert main(args) == 0
    assert '"step": 3' in capsys.readouterr().out
    assert (tmp_path / "run" / "final" / "model.safetensors").is_file()
    assert len(train_records(tmp_path / "run")) >= 1
    assert main(["train", "--config", str(recipe), "--set", "optimizer.lr=fast"]) == 2
