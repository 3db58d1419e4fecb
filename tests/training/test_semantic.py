"""The semantic branch alone on cached tap features (``branch: "semantic"``): what trains, what stays, the cache,
resume, the held-out evaluation, and starting parts of a model from a trained one."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from dualtoken import DualTokenizer
from dualtoken.errors import ConfigError, DataError
from dualtoken.factory import build_tokenizer, init_parts_from
from dualtoken.training import train
from dualtoken.training.semantic import _fingerprint, evaluate_semantic

from .conftest import changed, initial_state, tiny_config, train_records, write_images

SEMANTIC = ("branch=semantic", "freeze.preset=stage0", "loss.pooled_kl=1.0", "cache.crops_per_image=2")


def _config(out: Path, data: Path, *extra: str):
    return tiny_config(out, data, *SEMANTIC, "cache.shard_images=5", *extra)


def _state(folder: str | Path) -> dict[str, torch.Tensor]:
    return DualTokenizer.from_pretrained(folder).state_dict()


def test_only_the_semantic_branch_and_the_tail_train(tmp_path: Path, train_images: Path):
    config = _config(tmp_path / "run", train_images, "max_steps=6")
    initial = initial_state(config)
    summary = train(config)
    trained = _state(summary["export"])
    assert changed(initial, trained, "semantic.down.")
    assert changed(initial, trained, "semantic.quantizer.codebook")  # EMA updates
    last_layer = f"backbone.vision_model.encoder.layers.{build_tokenizer(config).backbone.num_layers - 1}."
    assert changed(initial, trained, last_layer)  # the tail trains unless freeze.tail
    for prefix in ("pixel.", "decoder.", "backbone.vision_model.embeddings."):
        assert not changed(initial, trained, prefix), prefix
    records = train_records(tmp_path / "run")
    assert [r["step"] for r in records] == list(range(1, 7))
    assert {"loss", "token_cosine", "pooled_kl", "semantic_commitment", "grad_norm", "samples_per_s"} <= set(records[0])


def test_a_frozen_tail_keeps_its_weights(tmp_path: Path, train_images: Path):
    config = _config(tmp_path / "run", train_images, "freeze.tail=true")
    initial = initial_state(config)
    trained = _state(train(config)["export"])
    assert not changed(initial, trained, "backbone.")
    assert changed(initial, trained, "semantic.up.")


def test_features_are_cached_once_in_shards_and_refused_for_other_settings(tmp_path: Path, train_images: Path):
    cache = tmp_path / "cache"
    train(_config(tmp_path / "a", train_images, f"cache.folder={cache}"))
    shards = sorted((cache / "train").glob("shard-*.pt"))
    assert len(shards) == 3  # 12 images in shards of 5
    stamps = [p.stat().st_mtime_ns for p in shards]
    shard = torch.load(shards[0], weights_only=True)
    assert shard["inputs"].dtype == torch.float16 and shard["inputs"].shape[0] == 10  # 5 images x 2 crops
    assert len(set(shard["ids"])) == 10
    train(_config(tmp_path / "b", train_images, f"cache.folder={cache}"))
    assert [p.stat().st_mtime_ns for p in shards] == stamps  # read back, not recomputed
    with pytest.raises(DataError, match="another model, data or crop setting"):
        train(_config(tmp_path / "c", train_images, f"cache.folder={cache}", "data.crop_scale=[0.5,0.6]"))
    moved = tmp_path / "moved"  # the same images elsewhere (a moved checkout) keep their cache
    shutil.copytree(train_images, moved)
    train(_config(tmp_path / "d", moved, f"cache.folder={cache}"))
    assert [p.stat().st_mtime_ns for p in shards] == stamps
    next(moved.iterdir()).unlink()  # one image fewer is other data
    with pytest.raises(DataError, match="another model, data or crop setting"):
        train(_config(tmp_path / "e", moved, f"cache.folder={cache}"))


def test_an_interrupted_cache_build_resumes(tmp_path: Path, train_images: Path):
    cache = tmp_path / "cache"
    train(_config(tmp_path / "a", train_images, f"cache.folder={cache}"))
    (cache / "train" / "shard-00001.pt").unlink()
    summary = train(_config(tmp_path / "b", train_images, f"cache.folder={cache}"))
    assert (cache / "train" / "shard-00001.pt").is_file() and summary["step"] == 4


def test_resume_equals_an_uninterrupted_run(tmp_path: Path, train_images: Path):
    straight = train(_config(tmp_path / "a", train_images, "max_steps=6"))
    assert train(_config(tmp_path / "b", train_images, "max_steps=6"), stop_at=3)["export"] is None
    resumed = train(_config(tmp_path / "b", train_images, "max_steps=6"))
    losses_a = [r["loss"] for r in train_records(tmp_path / "a")]
    losses_b = [r["loss"] for r in train_records(tmp_path / "b")]
    assert losses_b == pytest.approx(losses_a, rel=1e-5)
    a, b = _state(straight["export"]), _state(resumed["export"])
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-5, atol=1e-6, msg=name)


def test_heldout_evaluation_per_depth_with_labels(tmp_path: Path, train_images: Path):
    heldout = write_images(tmp_path / "heldout", 4, seed=1)
    labels = tmp_path / "heldout.tsv"
    labels.write_text("file\tclass_index\n" + "".join(f"heldout/img{i:03d}.png\t{i}\n" for i in range(4)))
    out = tmp_path / "run"
    train(_config(out, train_images, f"data.eval={labels}"))
    metrics = json.loads((out / "semantic_eval.json").read_text())
    depth = DualTokenizer.from_pretrained(out / "final").semantic_depth
    for k in range(1, depth + 1):
        assert -1 <= metrics[f"token_cosine@{k}"] <= 1
        assert 0 <= metrics[f"top1@{k}"] <= metrics[f"top5@{k}"] <= 1
        assert 0 < metrics[f"semantic/depth{k - 1}/usage"] <= 1
    assert "teacher_top1" in metrics and heldout.is_dir()


def test_evaluation_scores_a_perfect_copy_as_the_teacher(tmp_path: Path, train_images: Path):
    """With the unquantized tokens as features, cosine is 1 and the pooled argmax agrees with the teacher."""
    from dualtoken.training.semantic import FeatureCache

    tok = DualTokenizer.from_config("dualtoken-tiny").eval()
    tokens = torch.randn(3, tok.grid[0] * tok.grid[1], tok.backbone.tap_width(tok.config.semantic_layer))
    pooled = tok.pool_from_features(tokens)
    cache = FeatureCache(inputs=tokens, target_tokens=tokens, pooled=pooled, ids=["a#0", "b#0", "c#0"])
    metrics = evaluate_semantic(tok, cache, labels=pooled.argmax(-1))
    assert metrics["teacher_top1"] == 1.0
    depth = tok.semantic_depth
    assert metrics[f"token_cosine@{depth}"] < 1.0  # quantized, so not a perfect copy
    assert metrics[f"top1@{depth}"] == metrics[f"teacher_agreement@{depth}"]


def test_semantic_branch_needs_a_frozen_tower_below_the_tap(tmp_path: Path, train_images: Path):
    with pytest.raises(ConfigError, match="stage0"):
        tiny_config(tmp_path, train_images, "branch=semantic", "freeze.preset=stage1")


def test_init_parts_from_copies_only_the_listed_parts():
    trained = DualTokenizer.from_config("dualtoken-tiny")
    fresh = DualTokenizer.from_config("dualtoken-tiny")
    with torch.no_grad():
        for parameter in trained.parameters():
            parameter.add_(1.0)
    copied = init_parts_from(fresh, trained, ["pixel", "decoder"])
    assert copied and all(name.startswith(("pixel.", "pixel_shortcut.", "decoder.")) for name in copied)
    mine, theirs = fresh.state_dict(), trained.state_dict()
    assert all(torch.equal(mine[name], theirs[name]) for name in copied)
    assert not torch.equal(mine["semantic.down.proj.weight"], theirs["semantic.down.proj.weight"])


def test_init_parts_from_names_a_weight_that_does_not_fit():
    from dualtoken import get_config
    from dualtoken.config import apply_overrides

    other = DualTokenizer.from_config(apply_overrides(get_config("dualtoken-tiny"), ["semantic_quantizer.code_dim=16"]))
    with pytest.raises(ConfigError, match="semantic.*drop its part"):
        init_parts_from(DualTokenizer.from_config("dualtoken-tiny"), other, ["semantic"])


def _tiny_with(*overrides: str) -> DualTokenizer:
    from dualtoken import get_config
    from dualtoken.config import apply_overrides

    return DualTokenizer.from_config(apply_overrides(get_config("dualtoken-tiny"), list(overrides)))


def test_a_larger_codebook_starts_from_a_trained_one():
    torch.manual_seed(0)
    trained = _tiny_with()
    with torch.no_grad():
        trained.semantic.quantizer.cluster_size.fill_(5.0)
    larger = _tiny_with("semantic_quantizer.codebook_size=600")
    with pytest.raises(ConfigError, match="init_grow_codebooks"):
        init_parts_from(larger, trained, ["semantic"])
    init_parts_from(larger, trained, ["semantic"], grow_codebooks=True)
    small, grown = trained.semantic.quantizer, larger.semantic.quantizer
    assert torch.equal(grown.codebook[:256], small.codebook)
    assert torch.equal(grown.cluster_size[:256], small.cluster_size) and not grown.cluster_size[256:].any()
    tokens = torch.randn(4, 64, 8)
    assert torch.allclose(grown(tokens, update=False).quantized, small(tokens, update=False).quantized)
    grown.train()(tokens)
    assert (grown.cluster_size[256:] > 0).all()  # the first update restarted every added code
    assert not torch.equal(grown.codebook[256:512], small.codebook)
    for other in ("semantic_quantizer.code_dim=16", "semantic_quantizer.codebook_size=128"):  # never grown
        with pytest.raises(ConfigError, match="drop its part") as caught:
            init_parts_from(_tiny_with(other), trained, ["semantic"], grow_codebooks=True)
        assert "init_grow_codebooks" not in str(caught.value)


def test_a_shared_codebook_starts_per_depth_codebooks_with_the_same_output():
    trained = _tiny_with()
    with torch.no_grad():
        trained.pixel.quantizer.cluster_size.uniform_(0.5, 3.0)
    per_depth = _tiny_with("pixel_quantizer.codebook_sharing=per_depth")
    init_parts_from(per_depth, trained, ["pixel"])
    shared, split = trained.pixel.quantizer, per_depth.pixel.quantizer
    assert split.codebook.shape == (split.depth, *shared.codebook.shape)
    assert all(torch.equal(split.codebook[q], shared.codebook) for q in range(split.depth))
    assert all(torch.equal(split.cluster_size[q], shared.cluster_size) for q in range(split.depth))
    latents = torch.randn(3, 64, shared.config.code_dim)
    before, after = shared(latents, update=False), split(latents, update=False)
    assert torch.equal(before.codes, after.codes) and torch.allclose(before.quantized, after.quantized)


def test_the_cache_depends_on_the_tower_below_the_tap_only(tmp_path: Path, train_images: Path):
    config = _config(tmp_path / "run", train_images)
    tokenizer = build_tokenizer(config)
    layers = tokenizer.backbone.parts()
    before = _fingerprint(config, tokenizer, ["a"], True)
    with torch.no_grad():
        next(layers[tokenizer.config.semantic_layer + 1].parameters()).add_(1.0)  # a trained tail
    assert _fingerprint(config, tokenizer, ["a"], True) == before
    with torch.no_grad():
        next(layers[tokenizer.config.semantic_layer].parameters()).add_(1.0)  # the tap itself moved
    assert _fingerprint(config, tokenizer, ["a"], True) != before


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without CUDA")
def test_a_device_that_is_absent_is_refused(tmp_path: Path, train_images: Path):
    with pytest.raises(ConfigError, match="CUDA is not available"):
        train(_config(tmp_path / "gpu", train_images, "device=cuda"))


@pytest.mark.parametrize(
    "setting, key",
    [("codebook_init.method=kmeans", "codebook_init.method"), ("data.eval_image_size=64", "data.eval_image_size")],
)
def test_settings_that_cannot_apply_are_refused_naming_the_key(tmp_path: Path, train_images: Path, setting, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")) as refused:
        train(_config(tmp_path / "run", train_images, setting))
    assert len(str(refused.value).splitlines()) == 1
