"""recipes/efflite0/ablation.py end to end at tiny size: EfficientNet-Lite0 at 64 px, two steps per variant."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from dualtoken import DualTokenizer, get_config
from dualtoken.config import apply_overrides
from dualtoken.errors import DataError
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
        "data": {"train": str(images), "batch_size": 2, "num_workers": 0},
        "cache": {"taps": True, "crops_per_image": 1},
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


def test_paired_interval_reads_the_difference_on_the_same_images(ablation):
    generator = torch.Generator().manual_seed(0)
    spread = torch.rand(40, generator=generator) * 10.0  # images differ a lot; the runs differ by 0.5 +- 0.1
    better = spread + 0.5 + 0.1 * torch.randn(40, generator=generator)
    paired = ablation.bootstrap(better - spread, 1000)
    unpaired = [ablation.bootstrap(values, 1000) for values in (better, spread)]
    assert paired["low"] > 0.3 and paired["high"] < 0.7
    assert unpaired[0]["low"] < unpaired[1]["high"]  # unpaired, the intervals overlap
    assert ablation.verdict(paired) == "shown"
    assert ablation.verdict({"low": -0.2, "high": 0.1}) == "not shown"
    assert ablation.verdict({"low": -0.2, "high": -0.1}) == "reversed"


def test_seeds_name_the_extra_runs(ablation):
    model = get_config("dualtoken-efflite0-256")
    runs = ablation.plan_runs(model, ablation.parse_seeds(["a=0,1", "d=1,0"], 0), 0)
    assert list(runs) == ["a_single_deep_both", "b_single_deep_recon", "c_single_shallow_recon", "d_dualtoken",
                          "a_single_deep_both_seed1", "d_dualtoken_seed1"]
    assert runs["d_dualtoken_seed1"]["overrides"][-1] == "seed=1"


def _argv(tmp_path: Path, out: Path, *extra: str) -> list[str]:
    images = write_images(tmp_path / "train", 6)
    kodak = write_images(tmp_path / "kodak", 3, seed=1)
    heldout = write_images(tmp_path / "heldout", 3, seed=2)
    (heldout / "labels.tsv").write_text("file\tclass_index\n" + "".join(f"img{i:03d}.png\t{i}\n" for i in range(3)))
    return ["--recipe", str(_recipe(tmp_path, images)), "--out", str(out), "--steps", "2", "--export-every", "1",
            "--kodak", str(kodak), "--heldout", str(heldout / "labels.tsv"), "--bootstrap", "200", *extra]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--set", 'model_overrides=["pixel_quantizer.codebook_size=512"]'], "whole depths"),
        (["--seeds", "e=1"], "unknown variant"),
        (["--kodak", "no/such/folder"], "no/such/folder"),
        (["--heldout", "no/such/labels.tsv"], "no/such/labels.tsv"),
    ],
)
def test_bad_input_is_one_line_and_exit_2_before_training(tmp_path: Path, ablation, capsys, extra, message):
    out = tmp_path / "ablation"
    with pytest.raises(SystemExit) as raised:
        ablation.main(_argv(tmp_path, out, *extra))
    error = capsys.readouterr().err
    assert raised.value.code == 2 and error.count("\n") == 1 and message in error
    assert not out.exists()


def test_one_command_trains_scores_and_writes_the_table(tmp_path: Path, ablation):
    out = tmp_path / "ablation"
    argv = _argv(tmp_path, out, "--seeds", "d=0,1")
    table = ablation.main(argv).read_text()
    result = json.loads((out / "ablation.json").read_text())
    rows = result["rows"]
    assert [r["run"] for r in rows] == [
        "a_single_deep_both", "b_single_deep_recon", "c_single_shallow_recon", "d_dualtoken", "d_dualtoken_seed1"
    ]
    for row in rows:
        assert row["step"] == 2 and row["steps"] == 2 and row["bits"] == 80 and row["seconds"] > 0
        scores = row["scores"]
        assert scores["psnr"]["n"] == 3 and scores["top1"]["n"] == 3 and scores["top5"]["n"] == 3
        assert scores["psnr"]["low"] <= scores["psnr"]["mean"] <= scores["psnr"]["high"]
        assert scores["top1"]["mean"] <= scores["top5"]["mean"]
        assert -1.0 <= scores["token_cosine"]["mean"] <= 1.0
        assert all(0.0 < share <= 1.0 for share in row["usage"]["semantic"])
    assert len(rows[0]["usage"]["semantic"]) == 8 and "pixel" not in rows[0]["usage"]
    assert [len(rows[3]["usage"][v]) for v in ("pixel", "semantic")] == [4, 4]
    # differences: (d) - (a), (b), (c) for each seed of (d); paired on the same images; token cosine only at one tap
    diffs = {d["pair"]: d for d in result["differences"]}
    assert list(diffs) == [
        "d_dualtoken - a_single_deep_both", "d_dualtoken - b_single_deep_recon", "d_dualtoken - c_single_shallow_recon",
        "d_dualtoken_seed1 - a_single_deep_both", "d_dualtoken_seed1 - b_single_deep_recon",
        "d_dualtoken_seed1 - c_single_shallow_recon",
    ]
    first = diffs["d_dualtoken - a_single_deep_both"]
    assert first["psnr"]["mean"] == pytest.approx(rows[3]["scores"]["psnr"]["mean"] - rows[0]["scores"]["psnr"]["mean"])
    assert first["psnr"]["verdict"] in {"shown", "not shown", "reversed"}
    assert diffs["d_dualtoken - c_single_shallow_recon"]["token_cosine"] is None
    assert (out / "ablation.png").read_bytes()[:4] == b"\x89PNG"
    assert DualTokenizer.from_pretrained(out / "a_single_deep_both" / "export-00000002").config.pixel_quantizer is None
    assert table.count("\n| ") == 6 + 7 + 8 + 6 and "held-out top-5" in table and "token cosine" in table
    # one tap cache per seed, shared by the variants; the scored images' tower tokens computed once
    assert sorted(p.name for p in out.glob("crops-seed*")) == ["crops-seed0", "crops-seed1"]
    assert not list(out.glob("*/features")) and len(list(out.glob("eval-taps-*.pt"))) == 1
    assert [[p["step"] for p in points] for points in result["curves"].values()] == [[1, 2]] * 5
    assert result["curves"]["d_dualtoken"][-1]["psnr"] == pytest.approx(rows[3]["scores"]["psnr"]["mean"])
    assert (out / "curves.png").read_bytes()[:4] == b"\x89PNG" and "Learning curves" in table
    # a second call trains and scores nothing again and writes the same table
    stamps = [(out / name / "summary.json").stat().st_mtime_ns for name in ("a_single_deep_both", "d_dualtoken_seed1")]
    assert ablation.main(argv).read_text() == table
    assert [(out / n / "summary.json").stat().st_mtime_ns for n in ("a_single_deep_both", "d_dualtoken_seed1")] == stamps


@pytest.mark.parametrize("variant", ["a_single_deep_both", "c_single_shallow_recon", "d_dualtoken"])
def test_scoring_on_cached_tower_tokens_is_scoring_on_images(tmp_path: Path, ablation, variant):
    model = get_config("dualtoken-efflite0-256")
    base = load_train_config(None, ["model=dualtoken-efflite0-256", "model_overrides=[\"backbone.image_size=64\"]"])
    config = ablation.variant_config(base, ablation.variants(model)[variant])
    tokenizer = DualTokenizer.from_config(apply_overrides(model, [*config.model_overrides, "decoder.resolution=64",
                                                                 "decoder.attn_resolutions=[4]"])).eval()
    kodak = write_images(tmp_path / "kodak", 3, seed=1)
    heldout = write_images(tmp_path / "heldout", 2, seed=2)
    (heldout / "labels.tsv").write_text("file\tclass_index\n" + "".join(f"img{i:03d}.png\t{i}\n" for i in range(2)))
    taps = ablation.eval_taps(tokenizer, [5, 11], str(kodak), str(heldout / "labels.tsv"), None)
    with torch.no_grad():
        cached = ablation.encode_taps(tokenizer, {layer: taps.kodak_tokens[layer] for layer in tokenizer.tap_layers()})
        direct = tokenizer.encode(taps.kodak_images, precision="fp32")  # the scores are float32's
    assert torch.equal(cached.pixel, direct.pixel) and torch.equal(cached.semantic, direct.semantic)
    scores = ablation.per_image_scores(tokenizer, taps, str(heldout / "labels.tsv"))
    assert len(scores["kodak"]["psnr"]) == 3 and len(scores["heldout"]["top1"]) == 2
    tokenizer.backbone.parts()[1].requires_grad_(False)
    with torch.no_grad():
        next(tokenizer.backbone.parts()[1].parameters()).add_(1.0)  # another tower: its tokens are not these
    with pytest.raises(DataError, match="not the one the cached tokens came from"):
        ablation.per_image_scores(tokenizer, taps, str(heldout / "labels.tsv"))


def test_the_recipe_caches_the_taps_and_starts_every_codebook_by_kmeans(ablation):
    config = load_train_config(ablation.HERE / "ablation.json")
    assert config.cache.taps and config.codebook_init.method == "kmeans" and config.freeze.preset == "stage0"
