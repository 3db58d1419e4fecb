"""The CIFAR-10 demonstration recipe end to end at a tiny size (a random dualtoken-tiny, a few steps)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dualtoken import DualTokenizer
from dualtoken.mllm import MLLMTrainConfig
from dualtoken.mllm.config import load_config

RECIPE = Path(__file__).resolve().parents[2] / "recipes" / "mllm_cifar" / "run.py"
TINY = [
    "train_limit=20",
    "test_limit=10",
    "steps=2",
    "batch_size=2",
    "llm.hidden_size=64",
    "llm.intermediate_size=128",
    "heads.width=32",
    "samples_per_class=1",
    "eval_batch_size=10",
    "probe_steps=5",
    "judge_train_images=12",
    "text_vocab=300",
    "image_size=null",  # the tiny tokenizer is a SigLIP: it runs at its own size only
]


def _recipe_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("mllm_cifar_run", RECIPE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_recipe_tokenizes_at_its_own_size_with_the_same_weights(tmp_path):
    recipe = _recipe_module()
    source = DualTokenizer.from_config("dualtoken-efflite0-256").save_pretrained(tmp_path / "efflite0")
    cfg = recipe.RecipeConfig(tokenizer=str(source), work=str(tmp_path / "work"), image_size=128)
    tokenizer, reference = recipe.visual_tokenizer(cfg)
    assert tokenizer.grid == (8, 8) and reference == str((tmp_path / "work" / "tokenizer").resolve())
    assert torch.equal(tokenizer.codebook("pixel"), DualTokenizer.from_pretrained(source).codebook("pixel"))
    again, _ = recipe.visual_tokenizer(cfg)  # written once, then read
    assert again.grid == (8, 8)
    cfg.image_size = 256
    assert recipe.visual_tokenizer(cfg)[1] == str(source.resolve())


def test_answers_and_prompts_use_the_right_article():
    recipe = _recipe_module()
    assert recipe.with_article("airplane") == "an airplane"
    assert recipe.with_article("automobile") == "an automobile"
    assert recipe.with_article("horse") == "a horse" and recipe.with_article("truck") == "a truck"


@pytest.mark.slow
@pytest.mark.data
def test_cifar_recipe_runs_every_stage(tmp_path, shared_data, tiny_tokenizer):
    tiny_tokenizer.save_pretrained(tmp_path / "tokenizer")
    work = tmp_path / "work"
    overrides = [
        f"tokenizer={tmp_path / 'tokenizer'}",
        f"data={shared_data / 'cifar10'}",
        f"work={work}",
        *TINY,
    ]
    command = [sys.executable, str(RECIPE), "all"] + [arg for o in overrides for arg in ("--set", o)]
    done = subprocess.run(
        command, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )
    assert done.returncode == 0, done.stderr[-3000:]

    conversations = json.loads((work / "conversations.json").read_text())
    assert len(conversations) == 20 and conversations[0]["conversations"][1]["value"].startswith("It is a")
    answers = {c["conversations"][1]["value"] for c in conversations}
    assert not {"It is a airplane.", "It is a automobile."} & answers
    for mode in ("both", "semantic", "pixel"):
        config = load_config(MLLMTrainConfig, work / f"train_{mode}.json")
        assert config.model.fusion.inputs == mode and config.max_steps == 2
        assert (work / "runs" / mode / "final" / "mllm_config.json").is_file()

    results = json.loads((work / "results.json").read_text())
    assert results["train_images"] == 20 and results["test_images"] == 10
    assert set(results["understanding"]) == {"both", "semantic", "pixel"}
    for row in results["understanding"].values():
        assert all(
            0.0 <= row[key] <= 1.0 for key in ("mllm_accuracy", "exact_answers", "linear_probe_accuracy")
        )
    for key in ("without_cfg", "cfg_3"):
        row = results["generation"][key]
        assert row["images"] == 10 and 0.0 <= row["requested_class_accuracy"] <= 1.0
        low, high = row["requested_class_interval_95"]
        assert 0.0 <= low <= row["requested_class_accuracy"] <= high <= 1.0 and high - low > 0.2  # 10 images
        assert row["frechet_efficientnet_lite0"] > 0
    assert [Path(g).name for g in results["generation"]["grids"]] == [
        "samples_without_cfg.png",
        "samples_cfg_3.png",
        "samples_by_guidance.png",
    ]
    for grid in results["generation"]["grids"]:
        width, height = Image.open(grid).size
        assert height > 10 * 64 and width > 64  # one row per class, labelled with its prompt, one sample each
    per_image = torch.load(work / "per_image.pt", weights_only=False)  # what pair_study.py bootstraps
    assert set(per_image["understanding"]) == {"both", "semantic", "pixel"}
    assert per_image["understanding"]["both"].shape == (10,) and per_image["real_test_features"].shape[0] == 10
    assert per_image["generation"]["cfg_3"]["features"].shape[0] == 10
    assert 0.0 <= results["generation"]["judge_on_real_test_images"] <= 1.0
    # the real images' features are kept for the next evaluation: the judge's 12, the reference's 10, the test 10
    kept = sorted(p.name for p in work.glob("features_*.pt"))
    assert kept == ["features_test_10_64x64.pt", "features_train_10_64x64.pt", "features_train_12_64x64.pt"]
    low, high = results["understanding"]["both"]["mllm_accuracy_interval_95"]
    assert 0.0 <= low <= results["understanding"]["both"]["mllm_accuracy"] <= high <= 1.0
    assert "| semantic + pixel |" in (work / "results.md").read_text()
    assert "95 % interval" in (work / "results.md").read_text()
    # every pair of modes compared on the same images: the paired difference lies within its interval
    assert set(results["understanding_differences"]) == {"both - semantic", "both - pixel", "semantic - pixel"}
    for pair, row in results["understanding_differences"].items():
        a, b = pair.split(" - ")
        expected = results["understanding"][a]["mllm_accuracy"] - results["understanding"][b]["mllm_accuracy"]
        assert abs(row["mean"] - expected) < 1e-6 and row["low"] <= row["mean"] <= row["high"]
    assert "| semantic + pixel - semantic only |" in (work / "results.md").read_text()

    # an override given to the train stage reaches the training config (it is built from the recipe, not the
    # prepare stage's files): two more steps resume the same runs
    train_again = [*command[:2], "train", *command[3:], "--set", "steps=4", "--set", "modes=[\"both\"]"]
    done = subprocess.run(
        train_again, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert load_config(MLLMTrainConfig, work / "train_both.json").max_steps == 4
    steps = [json.loads(line)["step"] for line in (work / "runs" / "both" / "metrics.jsonl").read_text().splitlines()]
    assert max(steps) == 4


def test_the_recipe_passes_a_depth_prefix_a_time_budget_and_exports(tmp_path):
    recipe = _recipe_module()
    cfg = recipe.RecipeConfig(work=str(tmp_path), pixel_depths=2, semantic_depths=3, predict_pixel_depths=1,
                              predict_semantic_depths=2, max_seconds=60.0, export_every=7)
    config = recipe.train_config(cfg, "semantic", "dualtoken-efflite0", 300)
    assert (config.model.pixel_depths, config.model.semantic_depths) == (2, 3)
    assert (config.model.predict_pixel_depths, config.model.predict_semantic_depths) == (1, 2)
    assert (config.max_seconds, config.checkpoint.export_every) == (60.0, 7)
    assert config.model.fusion.inputs == "semantic"
    assert recipe.RecipeConfig().pixel_depths is None and recipe.RecipeConfig().semantic_depths is None


def test_guidance_comparison_puts_each_scale_side_by_side_per_class():
    recipe = _recipe_module()
    names = ["cat", "dog"]
    scales = (1.0, 3.0)

    def colour(scale: int, cls: int, sample: int) -> np.ndarray:  # a distinct flat 16x16 picture per cell
        return np.full((16, 16, 3), (40 + 100 * scale, 40 + 100 * cls, 30 * sample), dtype=np.uint8)

    cells_by_scale = [[[colour(s, c, i) for i in range(4)] for c in range(2)] for s in range(2)]
    grid = recipe.guidance_comparison(cells_by_scale, scales, names, 2, "footer")

    def columns_of(scale: int, cls: int, sample: int) -> np.ndarray:
        return np.nonzero((grid == colour(scale, cls, sample)[0, 0]).all(-1).any(0))[0]

    for cls in range(2):
        order = [columns_of(s, cls, i) for s in range(2) for i in range(2)]
        assert all(len(x) == 16 for x in order)  # each of the first two samples of each scale, once
        assert all(a.max() < b.min() for a, b in zip(order, order[1:]))  # scale 1's samples, then scale 3's
        assert len(columns_of(0, cls, 2)) == 0  # only ``columns`` samples per scale
    one_sample = [[[colour(s, c, 0)] for c in range(2)] for s in range(2)]  # fewer samples than columns
    assert recipe.guidance_comparison(one_sample, scales, names, 3, "").shape[1] < grid.shape[1]


def test_drawing_with_a_mode_that_was_not_trained_is_refused_before_anything_runs(tmp_path):
    from dualtoken.errors import ConfigError

    recipe = _recipe_module()
    cfg = recipe.RecipeConfig(work=str(tmp_path / "none"), modes=("semantic",), generation_modes=("both",))
    with pytest.raises(ConfigError, match="generation_modes"):
        recipe.evaluate(cfg)
    done = subprocess.run(
        [sys.executable, str(RECIPE), "evaluate", "--set", f"work={tmp_path / 'none'}", "--set", 'modes=["semantic"]'],
        capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 2 and done.stderr.strip().count("\n") == 0 and "generation_modes" in done.stderr


def _run_recipe(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    return subprocess.run([sys.executable, str(RECIPE), *args], capture_output=True, text=True, cwd=cwd, env=env,
                          timeout=600)


def test_recipe_paths_are_taken_from_the_file_folder_and_set_from_the_working_directory(tmp_path, monkeypatch):
    recipe = _recipe_module()
    folder = tmp_path / "recipes"
    (folder / "model").mkdir(parents=True)
    (folder / "r.json").write_text(json.dumps({"data": "../data/cifar10", "work": "out", "tokenizer": "model"}))
    monkeypatch.chdir(tmp_path / "recipes" / "model")
    cfg = recipe.load_recipe(folder / "r.json", [])
    assert (cfg.data, cfg.work, cfg.tokenizer) == (
        str(tmp_path / "data" / "cifar10"), str(folder / "out"), str(folder / "model")
    )
    assert recipe.load_recipe(folder / "r.json", ["data=here"]).data == "here"  # taken from the working directory
    assert recipe.load_recipe(folder / "r.json", ["tokenizer=dualtoken-efflite0"]).tokenizer == "dualtoken-efflite0"


def test_missing_data_or_recipe_is_one_line_naming_the_path(tmp_path):
    result = _run_recipe(["prepare", "--config", str(RECIPE.with_name("quick.json")), "--set", "data=nowhere"], tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [
        f"run.py: no CIFAR-10 data at {tmp_path / 'nowhere'}: expected classes.txt and {{train,test}}-*.tar.gz there "
        "(../shared/data/cifar10 beside the repository; `data` in a recipe file is taken from the file's folder, "
        "with --set from the working directory)"
    ]
    assert list(tmp_path.iterdir()) == []  # nothing written
    result = _run_recipe(["prepare", "--config", "gone.json"], tmp_path)
    assert result.returncode == 2 and result.stderr.strip().splitlines() == ["run.py: recipe file not found: gone.json"]


@pytest.mark.data
@pytest.mark.parametrize("name", ["quick.json", "config.json", "prefix.json"])
def test_the_shipped_recipes_read_the_shared_data_from_any_working_directory(name, shared_data, tmp_path, monkeypatch):
    recipe = _recipe_module()
    monkeypatch.chdir(tmp_path)
    cfg = recipe.load_recipe(RECIPE.with_name(name), [])
    assert Path(cfg.data) == (shared_data / "cifar10").resolve() and len(recipe.class_names(cfg)) == 10
    assert Path(cfg.work).parent == RECIPE.parents[2] / "runs"  # outputs under the repository's runs/


@pytest.mark.slow
@pytest.mark.data
def test_the_quick_recipe_prepares_from_another_working_directory(shared_data, tmp_path):
    work = tmp_path / "work"
    args = ["prepare", "--config", str(RECIPE.with_name("quick.json")), "--set", f"work={work}",
            "--set", "train_limit=4", "--set", "test_limit=2"]
    result = _run_recipe(args, cwd=tmp_path)  # not the repository root: the file's ../../../shared/data is found
    assert result.returncode == 0, result.stderr[-3000:]
    assert len(json.loads((work / "conversations.json").read_text())) == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["work"]


def test_the_recipe_precision_reaches_training_and_the_quick_recipe_is_float32(tmp_path):
    recipe = _recipe_module()
    quick = recipe.load_recipe(RECIPE.with_name("quick.json"), [])
    assert quick.precision == "fp32"  # the same figures on every CPU (auto: bf16 where the CPU has bf16 units)
    cfg = recipe.RecipeConfig(work=str(tmp_path), precision="fp32")
    assert recipe.train_config(cfg, "both", "dualtoken-efflite0", 300).precision == "fp32"
    assert recipe.train_config(recipe.RecipeConfig(work=str(tmp_path)), "both", "x", 300).precision == "auto"
