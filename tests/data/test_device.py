"""Images packed into one file, decoded, and cropped on the device (here the CPU): what a batch holds, that the
crops are the images', the epoch order, and the loader state the trainer saves."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dualtoken.data import DeviceCropLoader, TrainLoader, pack_images, read_packed, resolve_source
from dualtoken.errors import DataError


def _write(folder: Path, sizes: list[tuple[int, int]], seed: int = 0) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for index, (h, w) in enumerate(sizes):
        low = rng.integers(0, 256, size=(4, 4, 3), dtype=np.uint8)
        path = folder / f"img{index}.png"
        Image.fromarray(low).resize((w, h), Image.BICUBIC).save(path)
        paths.append(path)
    return paths


def test_pack_shrinks_to_the_short_side_caps_the_aspect_and_skips_unreadable_files(tmp_path: Path):
    paths = _write(tmp_path / "img", [(100, 300), (40, 50), (300, 100)])
    (tmp_path / "bad.jpg").write_bytes(b"not an image")
    summary = pack_images([*paths, tmp_path / "bad.jpg"], tmp_path / "pack.pt", short_side=64, max_aspect=1.5, progress=False)
    assert summary["count"] == 3 and summary["skipped"] == 1 and summary["bytes"] > 0
    images = read_packed(tmp_path / "pack.pt", progress=False)
    assert [tuple(i.shape) for i in images] == [(3, 64, 96), (3, 40, 50), (3, 96, 64)]  # small images stay small
    assert all(i.dtype == torch.uint8 for i in images)
    with pytest.raises(DataError):
        pack_images([tmp_path / "bad.jpg"], tmp_path / "none.pt", progress=False)


def test_a_full_crop_reproduces_the_image():
    image = torch.randint(0, 256, (3, 32, 48), dtype=torch.uint8)
    small = torch.randint(0, 256, (3, 20, 16), dtype=torch.uint8)
    loader = DeviceCropLoader([image, small], (32, 48), batch_size=2, crop_scale=(1.0, 1.0), ratio=(1.5, 1.5))
    crops = loader.crop(torch.tensor([0]), torch.Generator().manual_seed(0))
    torch.testing.assert_close(crops[0], image.float() / 127.5 - 1, atol=1e-3, rtol=0)
    # the canvas beyond the small image repeats its edge, never zeros
    assert torch.equal(loader.canvas[1, :, 19, 16:], small[:, 19, 15:16].expand(3, 32))


def test_batches_cover_every_image_each_epoch_and_resume_exactly():
    images = [torch.full((3, 24, 30), i * 20, dtype=torch.uint8) for i in range(10)]
    loader = DeviceCropLoader(images, (16, 16), batch_size=3, crop_scale=(0.3, 0.6), seed=1)
    batches = [next(loader) for _ in range(3)]
    assert sorted(i for b in batches for i in b["ids"]) == sorted(set(i for b in batches for i in b["ids"]))
    assert batches[0]["images"].shape == (3, 3, 16, 16) and batches[0]["images"].dtype == torch.float32
    for batch in batches:  # constant images: each crop is its image's value
        expected = torch.tensor(batch["ids"], dtype=torch.float32) * 20 / 127.5 - 1
        torch.testing.assert_close(batch["images"].mean(dim=(1, 2, 3)), expected, atol=1e-4, rtol=0)
    assert loader.epoch == 0
    state = loader.state_dict()
    following = next(loader)
    assert loader.epoch == 1  # 10 images in batches of 3: the fourth batch starts the next epoch
    again = DeviceCropLoader(images, (16, 16), batch_size=3, crop_scale=(0.3, 0.6), seed=1)
    again.load_state_dict(state)
    resumed = next(again)
    assert resumed["ids"] == following["ids"] and torch.equal(resumed["images"], following["images"])


def test_the_file_loader_resumes_from_a_device_loader_state(tmp_path: Path):
    paths = _write(tmp_path / "img", [(40, 40)] * 4)
    device = DeviceCropLoader(read_packed(_pack(paths, tmp_path), progress=False), (32, 32), batch_size=2)
    next(device)
    files = TrainLoader(resolve_source(str(tmp_path / "img")), (32, 32), batch_size=2)
    with pytest.warns(RuntimeWarning, match="restarting epoch 0"):
        files.load_state_dict(device.state_dict())
    assert next(files)["images"].shape == (2, 3, 32, 32)


def _pack(paths: list[Path], folder: Path) -> Path:
    pack_images(paths, folder / "pack.pt", short_side=40, progress=False)
    return folder / "pack.pt"
