"""Every shipped recipe parses and validates; the CPU smoke recipe runs through the CLI (shortened)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from dualtoken import DualTokenizer, get_config
from dualtoken.cli.main import main
from dualtoken.config import apply_overrides
from dualtoken.training import load_train_config

from .conftest import load_recipe_script, train_records, write_images

RECIPES_DIR = Path(__file__).resolve().parents[2] / "recipes"
RECIPES = sorted(RECIPES_DIR.glob("*.json"))
# every tokenizer recipe, the efflite0 ones included (recipes/mllm_cifar holds the MLLM recipe's own config)
ALL_RECIPES = RECIPES + sorted((RECIPES_DIR / "efflite0").glob("*.json"))


def test_recipes_are_shipped():
    names = {p.stem for p in RECIPES}
    assert {"paper-stage1-so400m-384-rvq8", "smoke-cpu-tiny"} <= names


@pytest.mark.parametrize("recipe", ALL_RECIPES, ids=lambda p: str(p.relative_to(RECIPES_DIR)))
def test_recipe_validates_from_any_working_directory(recipe: Path, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = load_train_config(recipe)
    assert config.max_steps >= 1 and config.data.train
    assert Path(config.output_dir).is_absolute() and Path(config.data.train).is_absolute()
    assert RECIPES_DIR.parent / "runs" in Path(config.output_dir).parents  # runs/ of the repository, as before


@pytest.mark.parametrize("recipe", ["efflite0/default.json", "efflite0/cpu.json", "finetune-your-data.json"])
def test_shipped_file_lists_are_found_from_any_working_directory(recipe: str, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = load_train_config(RECIPES_DIR / recipe)
    assert Path(config.data.train) == RECIPES_DIR / "efflite0" / "train.txt"


def test_relative_paths_in_a_config_file_are_taken_from_its_folder(tmp_path, monkeypatch):
    folder = tmp_path / "configs"
    folder.mkdir()
    (folder / "model").mkdir()
    (folder / "run.json").write_text(json.dumps({
        "model": "model", "output_dir": "out", "data": {"train": "images", "eval": "/abs/eval"},
    }))
    monkeypatch.chdir(tmp_path)
    config = load_train_config(folder / "run.json", ["data.eval=heldout"])
    assert config.model == str(folder / "model") and config.output_dir == str(folder / "out")
    assert config.data.train == str(folder / "images")
    assert config.data.eval == "heldout"  # --set values are the command line's: from the working directory
    names = load_train_config(folder / "run.json", ["model=dualtoken-tiny"])
    assert names.model == "dualtoken-tiny"
    (folder / "named.json").write_text(json.dumps({"model": "org/name", "data": {"train": "x"}}))
    assert load_train_config(folder / "named.json").model == "org/name"  # no such folder: a Hub repo id


@pytest.mark.slow
@pytest.mark.data
def test_finetune_recipe_runs_as_shipped_on_the_embedded_model(tmp_path, monkeypatch, shared_data, capsys):
    monkeypatch.chdir(tmp_path)
    recipe = RECIPES_DIR / "finetune-your-data.json"
    shortened = ["max_steps=1", "data.batch_size=1", "data.num_workers=0", "data.eval_images=1",
                 "log.progress=false", "log.console=false", f"output_dir={tmp_path / 'run'}"]
    assert main(["train", "--config", str(recipe), *[a for s in shortened for a in ("--set", s)]]) == 0
    assert '"step": 1' in capsys.readouterr().out
    assert (tmp_path / "run" / "final" / "model.safetensors").is_file()


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


def test_learning_curve_reads_eval_records_and_draws_them(tmp_path: Path, capsys):
    curve = load_recipe_script("learning_curve")
    run = tmp_path / "run"
    run.mkdir()
    records = [
        {"step": 0, "kind": "eval", "psnr": 12.0, "samples_seen": 0},
        {"step": 10, "kind": "train", "total": 1.0},
        {"step": 50, "kind": "eval", "psnr": 16.0, "samples_seen": 800},
        {"step": 50, "kind": "eval", "psnr": 16.5, "samples_seen": 800},  # written again by a resumed run
        {"step": 100, "kind": "eval", "pixel_mse": 0.1},  # no psnr: not a point
    ]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    assert curve.eval_points(run, "psnr") == [(0, 0, 12.0), (50, 800, 16.5)]
    out = tmp_path / "curve.png"
    assert curve.main([f"cpu={run}", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| cpu | 50 | 800 | 16.50 |" in printed and out.stat().st_size > 1000
    with pytest.raises(SystemExit, match="no metrics.jsonl"):
        curve.eval_points(tmp_path, "psnr")
    # a run continued from the first's export: one curve, counted on from the first's last evaluation
    more = tmp_path / "more"
    more.mkdir()
    records = [{"step": 0, "kind": "eval", "psnr": 16.5, "samples_seen": 0},
               {"step": 20, "kind": "eval", "psnr": 17.0, "samples_seen": 320}]
    (more / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    assert curve.chained_points([run, more], "psnr") == [(0, 0, 12.0), (50, 800, 16.5), (70, 1120, 17.0)]
    assert curve.main([f"both={run}+{more}"]) == 0
    assert "| both | 70 | 1,120 | 17.00 |" in capsys.readouterr().out


def test_learning_curve_extrapolates_a_log_linear_trend():
    curve = load_recipe_script("learning_curve")
    # 1 dB per tenfold after a fast start: the later half of the points lies on 20 + log10(n / 1000)
    points = [(0, 0, 12.0), (1, 100, 15.0), (2, 1000, 20.0), (3, 10_000, 21.0), (4, 100_000, 22.0)]
    intercept, slope = curve.log_linear_trend(points)
    assert slope == pytest.approx(1.0) and intercept == pytest.approx(17.0)
    line = curve.extrapolation("cpu", points, 24.0)
    assert "+1.00 per tenfold" in line and "1e+07 images seen (100x this run)" in line
    assert "never reaches" in curve.extrapolation("flat", [(0, 0, 1.0), (1, 10, 2.0), (2, 100, 2.0)], 24.0)
    with pytest.raises(SystemExit, match="two evaluations"):
        curve.log_linear_trend([(0, 0, 1.0), (1, 10, 2.0)])


def test_ship_joins_parts_of_two_runs(tmp_path: Path):
    ship = load_recipe_script("ship")
    torch.manual_seed(0)
    pixel_run = DualTokenizer.from_config("dualtoken-efflite0-256").save_pretrained(tmp_path / "pixel")
    torch.manual_seed(1)
    semantic_run = DualTokenizer.from_config("dualtoken-efflite0-256").save_pretrained(tmp_path / "semantic")
    out = tmp_path / "shipped"
    ship.main([str(pixel_run), "--out", str(out), "--parts-from", str(semantic_run), "--parts", "semantic"])
    joined = DualTokenizer.from_pretrained(out)
    pixel, semantic = DualTokenizer.from_pretrained(pixel_run), DualTokenizer.from_pretrained(semantic_run)
    assert joined.config.name == "dualtoken-efflite0" and joined.image_size == (256, 256)
    assert torch.equal(joined.codebook("semantic"), semantic.codebook("semantic").half().float())
    assert torch.equal(joined.codebook("pixel"), pixel.codebook("pixel").half().float())
    wider = apply_overrides(get_config("dualtoken-efflite0-256"), ["semantic_quantizer.code_dim=56"])
    DualTokenizer.from_config(wider).save_pretrained(tmp_path / "wider")
    with pytest.raises(SystemExit, match="does not fit this model"):
        ship.main([str(pixel_run), "--out", str(tmp_path / "x"), "--parts-from", str(tmp_path / "wider")])


# so400m recipes at a size that steps in seconds: the same layers and taps, narrow, on 64 px inputs
SMALL_SO400M = [
    "backbone.image_size=64", "backbone.patch_size=16", "backbone.width=32", "backbone.num_heads=2",
    "backbone.mlp_width=64", "decoder.resolution=64", "decoder.latent_size=[4,4]", "decoder.channels=32",
    "decoder.channel_mult=[1,1,1,1,1]", "decoder.attn_resolutions=[4]", "decoder.in_channels=64",
    "decoder.norm_groups=8",
]


def _artifact(spec: str | None, tmp_path: Path, images: Path) -> str | None:
    """``spec`` itself, or, for a recipe's missing ``runs/<name>/final``, the model of the recipe that writes it
    (built as that recipe starts, without training): the stage graph of the shipped recipes."""
    if spec is None or Path(spec).exists() or "/runs/" not in spec:
        return spec
    for recipe in ALL_RECIPES:
        upstream = load_train_config(recipe)
        if Path(upstream.output_dir) / "final" == Path(spec):
            folder = tmp_path / "artifacts" / recipe.stem
            if not folder.exists():
                from dualtoken.factory import build_tokenizer

                build_tokenizer(_runnable(recipe, tmp_path, images)).save_pretrained(folder)
            return str(folder)
    raise AssertionError(f"no shipped recipe writes {spec}")


def _runnable(recipe: Path, tmp_path: Path, images: Path, *extra: str):
    """``recipe`` as shipped, on tiny data for one step; weights absent here (SigLIP, VGG) replaced by random
    initialisation, upstream artifacts by the models of the recipes that make them."""
    config = load_train_config(recipe)
    overrides = [
        f"output_dir={tmp_path / 'run' / recipe.stem}", f"data.train={images}", "data.eval=null", "max_steps=1",
        "data.batch_size=1", "data.num_workers=0", "codebook_init.batches=1", "log.progress=false", "log.console=false",
        "log.tensorboard=false", *extra,
    ]
    if config.backbone_pretrained and not Path(config.backbone_pretrained).exists():
        overrides += ["backbone_pretrained=null"]
    vgg_file = config.loss.vgg_weights  # None: torch's hub cache, empty and offline here
    if config.loss.perceptual_kind == "lpips_vgg16" and not (vgg_file and Path(vgg_file).is_file()):
        overrides += ["loss.perceptual=0", "loss.perceptual_kind=none"]
    if "so400m" in config.model:  # no SigLIP folder here: a random tower, its initial copy as the teacher
        overrides += ["model_overrides=" + json.dumps(config.model_overrides + SMALL_SO400M)]
        overrides += ["teacher=initial"] if config.teacher == "pretrained" else []
    if config.branch == "semantic":
        overrides += ["cache.crops_per_image=1", "cache.shard_images=4", f"cache.folder={tmp_path / 'cache' / recipe.stem}"]
    config = apply_overrides(config, overrides)
    model = _artifact(config.model, tmp_path, images)
    if model != config.model:  # a trained model: the overrides were its upstream recipe's
        config = apply_overrides(config, [f"model={model}", "model_overrides=[]"])
    return apply_overrides(config, [f"init_from={_artifact(config.init_from, tmp_path, images)}"]) if config.init_from else config


def test_efflite0_stages_start_from_the_export_of_the_stage_before():
    """The stage graph of recipes/efflite0/README.md: no stage starts from the embedded model that ship.py
    overwrites."""
    recipes = sorted((RECIPES_DIR / "efflite0").glob("*.json"))
    written_by = {Path(load_train_config(r).output_dir) / "final": r.name for r in recipes}
    starts = {r.name: load_train_config(r).init_from for r in recipes}
    assert {name: written_by.get(Path(start)) for name, start in starts.items() if start} == {
        "semantic.json": "cpu.json",
        "semantic_tail.json": "semantic.json",
        "semantic_16k.json": "semantic_tail.json",
        "pixel.json": "semantic_16k.json",
        "pixel_cpu.json": "semantic_16k.json",
        "pixel_stable.json": "semantic_16k.json",
    }


@pytest.mark.parametrize("recipe", ["semantic.json", "pixel.json", "pixel_cpu.json", "pixel_stable.json"])
def test_efflite0_stages_also_start_from_the_shipped_model_with_one_flag(recipe: str):
    from dualtoken.factory import build_tokenizer

    config = load_train_config(RECIPES_DIR / "efflite0" / recipe, ["init_from=dualtoken-efflite0"])
    started, shipped = build_tokenizer(config).state_dict(), DualTokenizer.from_pretrained("dualtoken-efflite0").state_dict()
    decoder = [name for name in shipped if name.startswith("decoder.")]
    assert decoder and all(torch.equal(started[name], shipped[name]) for name in decoder)


@pytest.mark.parametrize("recipe", ALL_RECIPES, ids=lambda p: str(p.relative_to(RECIPES_DIR)))
def test_every_recipe_builds_its_model_and_takes_a_step(recipe: Path, tmp_path: Path):
    from dualtoken.training import train

    images = write_images(tmp_path / "images", 4, size=(72, 80))
    summary = train(_runnable(recipe, tmp_path, images))
    assert summary["step"] == 1 and summary["metrics"]["loss"] > 0
    assert (Path(summary["export"]) / "model.safetensors").is_file()


def test_stability_probe_measures_the_reencoding_error_and_the_fidelity_a_target_needs(
    tmp_path: Path, train_images: Path, capsys
):
    probe = load_recipe_script("stability_probe")
    torch.manual_seed(0)
    tok = DualTokenizer.from_config("dualtoken-tiny")
    model = tok.save_pretrained(tmp_path / "tiny")
    size = str(tok.image_size[0])
    args = ["--model", str(model), "--data", str(train_images), "--images", "6", "--image-size", size]
    assert probe.main([*args, "--out", str(tmp_path / "out")]) == 0
    result = json.loads((tmp_path / "out" / "probe.json").read_text())
    assert result["images"] == 6 and result["reencode_error"] > 0 and result["quantization_error"] > 0
    assert 0 <= result["stability@1"] <= 1 and 0 < result["usage@1"] <= 1
    noise = [row["stability@1"] for row in result["isotropic_noise"]]
    assert noise[0] >= noise[-1]  # more noise, fewer codes come back
    assert (tmp_path / "out" / "stability_vs_error.png").stat().st_size > 1000
    assert "re-encoding error" in capsys.readouterr().out
    linear = result["best_linear_projection_error"]
    width = tok.config.pixel_quantizer.code_dim
    assert list(linear) == list(dict.fromkeys(str(w) for w in (4, width // 2, width)))
    assert all(value > 0 for value in linear.values())
    # the level is interpolated on a log scale between the measured levels that bracket the target
    assert probe.needed_level([(0.01, 0.9), (0.1, 0.5)], 0.7) == pytest.approx(0.01**0.5 * 0.1**0.5)
    assert probe.needed_level([(0.01, 0.5), (0.1, 0.4)], 0.6) is None
    assert probe.main([*args, "--data", str(tmp_path / "missing"), "--out", str(tmp_path / "x")]) == 2
    assert "not found" in capsys.readouterr().err and not (tmp_path / "x").exists()
    # other first depths: k-means codebooks of other sizes, and low-width lookups, on the same reconstructions
    fitted = ["--fit-data", str(train_images), "--codebook-sizes", "4", "8", "--lookup-widths", "2", str(width)]
    assert probe.main([*args, *fitted, "--out", str(tmp_path / "fit")]) == 0
    rows = json.loads((tmp_path / "fit" / "probe.json").read_text())["other_first_depths"]
    assert [(row["codebook_size"], row["lookup_width"]) for row in rows] == [(4, width), (8, width), (8, 2)]
    assert all(0 <= row["stability@1"] <= 1 and 0 < row["usage@1"] <= 1 for row in rows)
    assert "| 8 | 2 |" in capsys.readouterr().out
    assert result["other_first_depths"] == []  # none without --fit-data
    for bad in (["--lookup-widths", str(width + 1)], ["--codebook-sizes", "0"]):
        assert probe.main([*args, *fitted[:2], *bad, "--out", str(tmp_path / "bad")]) == 2
        assert "--lookup-widths between 1 and the code width" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()
