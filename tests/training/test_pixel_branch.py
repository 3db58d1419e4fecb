"""The pixel branch alone (``branch: "pixel"``), the k-means codebook start, and the wall-clock budget."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from dualtoken import DualTokenizer
from dualtoken.errors import ConfigError
from dualtoken.factory import build_tokenizer
from dualtoken.training import tokenizer_engine, train

from .conftest import changed, initial_state, tiny_config, train_records

PIXEL = ("branch=pixel", "teacher=none", "loss.semantic_weight=0", "freeze.preset=stage0", "loss.gan.enabled=false")


def test_only_the_pixel_path_and_the_decoder_train(tmp_path: Path, train_images: Path):
    config = tiny_config(tmp_path / "run", train_images, *PIXEL)
    initial = initial_state(config)
    summary = train(config)
    trained = DualTokenizer.from_pretrained(summary["export"]).state_dict()
    for prefix in ("pixel.down.", "pixel.up.", "pixel.quantizer.codebook", "pixel_shortcut.", "decoder."):
        assert changed(initial, trained, prefix), prefix
    for prefix in ("backbone.", "semantic."):
        assert not changed(initial, trained, prefix), prefix
    records = train_records(tmp_path / "run")
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert records[0]["semantic_commitment"] == 0.0 and "token_cosine" not in records[0]
    codebook = train_records(tmp_path / "run", "codebook")[-1]
    assert "pixel/depth3/perplexity" in codebook and "semantic/usage" not in codebook  # no semantic codes made


def test_the_pixel_branch_loss_is_the_full_objective_without_semantic_terms(tmp_path: Path, train_images: Path):
    """The first step's reconstruction terms equal those of the whole model (same weights, same batch)."""
    common = ("teacher=none", "loss.semantic_weight=0", "freeze.preset=stage0", "loss.gan.enabled=false", "max_steps=1")
    pixel = train(tiny_config(tmp_path / "pixel", train_images, "branch=pixel", *common))["metrics"]
    both = train(tiny_config(tmp_path / "both", train_images, *common))["metrics"]
    assert pixel["pixel_mse"] == pytest.approx(both["pixel_mse"], rel=1e-5)
    assert pixel["pixel_commitment"] == pytest.approx(both["pixel_commitment"], rel=1e-5)
    assert both["semantic_commitment"] > 0 and pixel["semantic_commitment"] == 0


@pytest.mark.parametrize(
    "overrides, message",
    [
        (("branch=pixel", "teacher=none", "loss.semantic_weight=0"), 'needs the tower below its tap frozen'),
        (("branch=pixel", "freeze.preset=stage0"), "no semantic path to distil"),
        (("max_seconds=-1",), "max_seconds"),
        (("codebook_init.batches=0",), "codebook_init"),
        (("codebook_init.shares=[1,0]",), "codebook_init.shares"),
    ],
)
def test_bad_settings_are_refused(tmp_path: Path, train_images: Path, overrides, message):
    with pytest.raises(ConfigError, match=message):
        tiny_config(tmp_path, train_images, *overrides)


def test_kmeans_init_starts_every_pixel_code_from_the_data(tmp_path: Path, train_images: Path):
    config = tiny_config(tmp_path / "run", train_images, *PIXEL, "codebook_init.method=kmeans", "codebook_init.batches=3")
    trainer = tokenizer_engine(config)
    quantizer = trainer.task.tokenizer.quantizer("pixel")
    latents = torch.cat([trainer.task.tokenizer.pixel_latents(next(trainer.task.loader)["images"]) for _ in range(2)])
    latents = latents.flatten(0, 1)
    error = (latents - quantizer(latents, update=False).quantized).pow(2).mean()
    random_start = build_tokenizer(config).quantizer("pixel")
    assert error < (latents - random_start(latents, update=False).quantized).pow(2).mean() / 4
    assert float(quantizer.cluster_size.min()) >= 1.0
    trainer.fit()
    init = train_records(tmp_path / "run", "codebook_init")
    assert len(init) == 1 and init[0]["step"] == 0
    assert sum(init[0][f"pixel/depth{q}/codes"] for q in range(4)) == quantizer.codebook_size
    assert init[0]["pixel/depth3/residual_mse"] < init[0]["pixel/depth0/residual_mse"]


def test_kmeans_shares_must_name_every_depth(tmp_path: Path, train_images: Path):
    config = tiny_config(tmp_path / "run", train_images, *PIXEL, "codebook_init.method=kmeans", "codebook_init.shares=[2,1]")
    with pytest.raises(ConfigError, match="2 entries for 4 depths"):
        tokenizer_engine(config)
    config = tiny_config(tmp_path / "ok", train_images, *PIXEL, "codebook_init.method=kmeans", "codebook_init.shares=[5,1,1,1]")
    assert [r["codes"] for r in tokenizer_engine(config).task.kmeans.report["pixel"]] == [160, 32, 32, 32]


def test_a_resumed_run_does_not_initialise_the_codebook_again(tmp_path: Path, train_images: Path):
    config = tiny_config(tmp_path / "run", train_images, *PIXEL, "codebook_init.method=kmeans")
    train(config, stop_at=2)
    resumed = tokenizer_engine(config)
    assert resumed.step == 2 and resumed.task.kmeans.report == {}


def test_the_wall_clock_budget_ends_the_run_with_a_checkpoint_and_an_export(tmp_path: Path, train_images: Path):
    config = tiny_config(tmp_path / "run", train_images, *PIXEL, "max_steps=1000", "max_seconds=0.001")
    summary = train(config)
    assert summary["out_of_time"] and summary["step"] == 1
    assert Path(summary["checkpoint"]).is_file() and (Path(summary["export"]) / "model.safetensors").is_file()
    # a resumed run goes on towards max_steps
    again = train(tiny_config(tmp_path / "run", train_images, *PIXEL, "max_steps=3"))
    assert again["resumed_from"] and again["step"] == 3 and not again["out_of_time"]


def test_the_reencoding_term_trains_the_decoder_towards_stable_codes(tmp_path: Path, train_images: Path):
    """loss.reencode adds its logged term, and its gradient reaches the decoder: the same run with and without it
    ends with different decoders but the same frozen tower."""
    runs = {}
    for weight in (0.0, 5.0):
        config = tiny_config(tmp_path / f"w{weight}", train_images, *PIXEL, f"loss.reencode={weight}", "max_steps=2")
        runs[weight] = train(config)
    assert "reencode" in runs[5.0]["metrics"] and "reencode" not in runs[0.0]["metrics"]
    assert runs[5.0]["metrics"]["reencode"] > 0
    plain, stable = (DualTokenizer.from_pretrained(runs[w]["export"]).state_dict() for w in (0.0, 5.0))
    assert any(not torch.equal(plain[k], stable[k]) for k in plain if k.startswith("decoder."))
    assert all(torch.equal(plain[k], stable[k]) for k in plain if k.startswith("backbone."))


def test_eval_records_count_the_samples_seen(tmp_path: Path, train_images: Path):
    config = tiny_config(tmp_path / "run", train_images, *PIXEL, f"data.eval={train_images}", "data.eval_images=2", "log.eval_every=2")
    train(config)
    evals = train_records(tmp_path / "run", "eval")
    assert [(r["step"], r["samples_seen"]) for r in evals] == [(0, 0), (2, 4), (4, 8)]
    assert all(r["psnr"] > 0 for r in evals)
    assert all(0 < r["pixel_usage@1"] <= 1 and 0 <= r["pixel_stability@1"] <= 1 for r in evals)


def test_the_held_out_images_are_scored_at_the_evaluation_size(tmp_path: Path, train_images: Path):
    small = '["backbone.image_size=64","decoder.resolution=64","decoder.attn_resolutions=[4]"]'
    config = tiny_config(
        tmp_path / "run", train_images, *PIXEL, "model=dualtoken-efflite0-256", f"model_overrides={small}",
        f"data.eval={train_images}", "data.eval_images=2", "data.eval_image_size=128",
    )
    trainer = tokenizer_engine(config)
    assert trainer.task.tokenizer.image_size == (64, 64) and trainer.task.heldout.images.shape[-2:] == (128, 128)
    scored = trainer.task.heldout.evaluate()
    assert scored["psnr"] > 0 and trainer.task.tokenizer.image_size == (64, 64)
    with torch.no_grad():  # the evaluation model follows the trained weights, not the ones it was built from
        trainer.task.tokenizer.decoder.conv_out.bias.add_(0.5)
    assert trainer.task.heldout.evaluate()["psnr"] != pytest.approx(scored["psnr"])
    with torch.no_grad():
        trainer.task.tokenizer.decoder.conv_out.bias.sub_(0.5)
    assert trainer.task.heldout.evaluate()["psnr"] == pytest.approx(scored["psnr"])
    # the same weights at the training size give another figure: the evaluation did run at 128 px
    trainer.config.data.eval_image_size = None
    trainer.task.heldout.images = torch.nn.functional.interpolate(trainer.task.heldout.images, size=64, mode="bilinear", antialias=True)
    assert trainer.task.heldout.evaluate()["psnr"] != pytest.approx(scored["psnr"])
    trainer.close()
