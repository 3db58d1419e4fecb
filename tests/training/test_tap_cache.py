"""The whole tokenizer trained on cached crops and tap tokens of the frozen tower (``cache.taps``)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from dualtoken import DualTokenizer, get_config
from dualtoken.errors import ConfigError, DataError
from dualtoken.training import tokenizer_engine, train

from .conftest import tiny_config, train_records

CACHED = ("cache.taps=true", "freeze.preset=stage0", "cache.crops_per_image=2", "cache.shard_images=5",
          "data.num_workers=0", "loss.gan.enabled=false")


def test_forward_from_tap_tokens_is_the_forward_from_images(tiny_images):
    tok = DualTokenizer.from_config(get_config("dualtoken-tiny")).eval()
    with torch.no_grad():
        tokens = tok.tap_tokens(tiny_images)
        assert sorted(tokens) == tok.tap_layers() == [1, 2, 5]  # shortcut, pixel tap, semantic tap
        direct, cached = tok(tiny_images), tok.forward_from_taps(tokens)
    assert torch.equal(direct.pixel_codes, cached.pixel_codes) and torch.equal(direct.semantic_codes, cached.semantic_codes)
    torch.testing.assert_close(cached.reconstruction, direct.reconstruction, rtol=0, atol=0)
    torch.testing.assert_close(cached.pooled, direct.pooled, rtol=0, atol=0)


def test_a_step_reads_the_crops_and_the_tokens_the_tower_gives_them(tmp_path: Path, train_images: Path):
    engine = tokenizer_engine(tiny_config(tmp_path / "run", train_images, *CACHED))
    task, tok = engine.task, engine.task.tokenizer
    assert task.teacher is None and len(task.cache) == 24  # 12 images x 2 crops; the teacher's targets are cached
    batch = next(task.loader)
    with torch.no_grad():  # the teacher is a copy of the initial tower ("initial"): before a step, the tower itself
        fresh = tok.tap_tokens(batch["images"])
        pooled = tok.backbone.pool(tok.backbone.forward_all(batch["images"])[-1])
    for layer, tokens in batch["taps"].items():  # float16 in the cache
        torch.testing.assert_close(tokens, fresh[layer], rtol=2e-3, atol=2e-3)
    torch.testing.assert_close(batch["targets"].tokens, fresh[5], rtol=2e-3, atol=2e-3)
    torch.testing.assert_close(batch["targets"].pooled, pooled, rtol=2e-3, atol=2e-3)
    summary = engine.run()
    records = train_records(tmp_path / "run")
    assert summary["step"] == 4 and all(r["token_mse"] > 0 and r["pixel_mse"] > 0 for r in records)


def test_the_cache_is_shared_between_runs_and_refused_for_other_layers(tmp_path: Path, train_images: Path):
    cache = tmp_path / "cache"
    train(tiny_config(tmp_path / "a", train_images, *CACHED, f"cache.folder={cache}", "cache.layers=[3]"))
    shards = sorted(cache.glob("shard-*.pt"))
    assert len(shards) == 3 and sorted(k for k in torch.load(shards[0], weights_only=True) if k.startswith("layer")) == [
        "layer1", "layer2", "layer3", "layer5"
    ]
    stamps = [p.stat().st_mtime_ns for p in shards]
    # a single vocabulary at layer 3 (another variant of an ablation) reads the same cache
    single = ("model_overrides=[\"pixel_quantizer=null\",\"shortcut_layer=null\",\"pixel_layer=3\",\"semantic_layer=3\"]",)
    train(tiny_config(tmp_path / "b", train_images, *CACHED, *single, f"cache.folder={cache}", "cache.layers=[1,2,5]"))
    assert [p.stat().st_mtime_ns for p in shards] == stamps
    with pytest.raises(DataError, match="another model, data or crop setting"):
        train(tiny_config(tmp_path / "c", train_images, *CACHED, f"cache.folder={cache}"))


def test_kmeans_starts_both_vocabularies_from_their_own_latents(tmp_path: Path, train_images: Path):
    config = tiny_config(tmp_path / "run", train_images, *CACHED, "codebook_init.method=kmeans", "codebook_init.batches=3")
    engine = tokenizer_engine(config)
    assert sorted(engine.task.kmeans.report) == ["pixel", "semantic"]
    tok = engine.task.tokenizer
    latents = engine.task.latents(next(engine.task.loader))
    for name in ("pixel", "semantic"):
        quantizer = tok.quantizer(name)
        values = latents[name].flatten(0, 1)
        fresh = DualTokenizer.from_config(tok.config).quantizer(name)
        error = (values - quantizer(values, update=False).quantized).pow(2).mean()
        assert error < (values - fresh(values, update=False).quantized).pow(2).mean() / 4, name


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (("cache.taps=true", "branch=pixel", "freeze.preset=stage0", "teacher=none", "loss.semantic_weight=0"),
         "branch \"both\""),
        (("cache.taps=true", "freeze.preset=stage1"), "layers 0..5 train"),
        (("cache.layers=[-1]",), "cache.layers"),
    ],
)
def test_settings_that_cannot_cache_are_refused(tmp_path: Path, train_images: Path, overrides, message):
    with pytest.raises(ConfigError, match=message):
        tokenizer_engine(tiny_config(tmp_path / "run", train_images, *overrides))
