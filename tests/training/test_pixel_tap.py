"""The pixel branch on cached pixel-tap tokens (``branch: "pixel"`` + ``cache.pixel_tap``)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from dualtoken import DualTokenizer
from dualtoken.errors import ConfigError, DataError
from dualtoken.training import tokenizer_engine, train
from dualtoken.training.pixel import pixel_tap_tokens

from .conftest import changed, initial_state, tiny_config, train_records

PIXEL = ("branch=pixel", "teacher=none", "loss.semantic_weight=0", "freeze.preset=stage0", "loss.gan.enabled=false")
CACHED = (*PIXEL, "cache.pixel_tap=true", "cache.dtype=float32")


def test_the_cached_path_computes_what_the_image_path_computes(tiny_tokenizer, tiny_images):
    """forward(tap tokens, pixel_tap=True) reconstructs as forward(images, pixel_only=True), shortcut included."""
    assert tiny_tokenizer.config.shortcut_layer is not None
    taps = pixel_tap_tokens(tiny_tokenizer, tiny_images)
    assert taps.shape == (2, 2, 64, tiny_tokenizer.backbone.tap_width(tiny_tokenizer.config.pixel_layer))
    with torch.no_grad():
        cached = tiny_tokenizer(taps, pixel_tap=True)
        direct = tiny_tokenizer(tiny_images, pixel_only=True)
    assert torch.equal(cached.pixel_codes, direct.pixel_codes)
    torch.testing.assert_close(cached.reconstruction, direct.reconstruction, rtol=1e-5, atol=1e-6)


def test_a_cached_step_equals_an_image_step(tmp_path: Path, train_images: Path):
    """One step over all 12 images (one batch): the same crops, the same loss terms as the image-loading task (in
    float32: the cache's tower runs in float32 whatever the training precision; and without dead-code restarts,
    which draw random replacements in batch order)."""
    restarts = 'model_overrides=["pixel_quantizer.restart_unused_codes=false"]'
    common = ("max_steps=1", "data.batch_size=12", "precision=fp32", restarts)
    cached = train(tiny_config(tmp_path / "cached", train_images, *CACHED, *common))["metrics"]
    images = train(tiny_config(tmp_path / "images", train_images, *PIXEL, *common))["metrics"]
    for name in ("loss", "pixel_mse", "pixel_commitment"):
        assert cached[name] == pytest.approx(images[name], rel=1e-5), name


def test_only_the_pixel_path_trains_and_the_tower_runs_once_per_crop(tmp_path: Path, train_images: Path, monkeypatch):
    config = tiny_config(tmp_path / "run", train_images, *CACHED, "cache.crops_per_image=2", "cache.batch_size=5")
    initial = initial_state(config)
    calls: list[int] = []
    original = type(DualTokenizer.from_config("dualtoken-tiny").backbone).forward_all

    def counted(self, images, stop=None):
        calls.append(images.shape[0])
        return original(self, images, stop)

    monkeypatch.setattr(type(DualTokenizer.from_config("dualtoken-tiny").backbone), "forward_all", counted)
    engine = tokenizer_engine(config)
    assert len(engine.task.cache) == 24 and sum(calls) == 24  # 12 images x 2 crops, in batches of at most 5
    assert max(calls) == 5
    summary = engine.run()
    assert sum(calls) == 24  # the steps never ran the tower
    trained = DualTokenizer.from_pretrained(summary["export"]).state_dict()
    for prefix in ("pixel.down.", "pixel.up.", "pixel.quantizer.codebook", "pixel_shortcut.", "decoder."):
        assert changed(initial, trained, prefix), prefix
    for prefix in ("backbone.", "semantic."):
        assert not changed(initial, trained, prefix), prefix
    assert [r["step"] for r in train_records(tmp_path / "run")] == [1, 2, 3, 4]


def test_crops_are_the_loaders_crops_stored_losslessly(tmp_path: Path, train_images: Path):
    from dualtoken.data import TrainLoader, resolve_source

    config = tiny_config(tmp_path / "run", train_images, *CACHED, "data.batch_size=12")
    engine = tokenizer_engine(config)
    loader = TrainLoader(resolve_source(str(train_images)), (64, 64), 12, 0, crop_scale=config.data.crop_scale)
    from_loader = {tuple(image.flatten()[:16].tolist()): image for image in next(iter(loader))["images"]}
    cached = engine.task.cache.batch(torch.arange(12))["images"]
    for image in cached:
        assert torch.equal(from_loader[tuple(image.flatten()[:16].tolist())], image)
    engine.close()


@pytest.mark.parametrize(
    "overrides, message",
    [
        (("cache.pixel_tap=true",), 'applies to branch "pixel" only'),
        ((*CACHED, "loss.reencode=1"), "loss.reencode does not apply"),
        ((*CACHED, "codebook_init.method=kmeans"), "codebook_init.method does not apply"),
        ((*CACHED, "cache.folder=x"), "cache.folder does not apply"),
    ],
)
def test_settings_that_need_the_tower_are_refused(tmp_path: Path, train_images: Path, overrides, message):
    with pytest.raises(ConfigError, match=message):
        tiny_config(tmp_path, train_images, *overrides)


def test_a_folder_without_readable_images_is_one_error(tmp_path: Path):
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "a.png").write_bytes(b"not a png")
    config = tiny_config(tmp_path / "run", tmp_path / "bad", *CACHED)
    with pytest.warns(UserWarning, match="a.png"), pytest.raises(DataError, match="no readable image"):
        tokenizer_engine(config)
