"""Small on-disk data sets for the data tests: a folder of PNGs (one corrupt), a file list, tar shards."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image


def png_bytes(seed: int, size: tuple[int, int] = (40, 48)) -> bytes:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, size=(size[0], size[1], 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def write_shard(path: Path, keys: list[str], corrupt: set[str] = frozenset()) -> None:
    """A WebDataset shard: KEY.png (+ KEY.cls) per sample; keys in ``corrupt`` get garbage bytes."""
    with tarfile.open(path, "w:gz" if path.name.endswith(".gz") else "w") as tar:
        for index, key in enumerate(keys):
            members = {
                "png": b"not a png" if key in corrupt else png_bytes(index),
                "cls": str(index % 3).encode(),
            }
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    """12 PNGs in two sub-folders, plus one corrupt file ``b/broken.png``."""
    root = tmp_path / "images"
    for index in range(12):
        path = root / ("a" if index < 6 else "b") / f"img{index:02d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(png_bytes(index))
    (root / "b" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    return root


@pytest.fixture
def shard_folder(tmp_path: Path) -> Path:
    """Three shards of 10 samples (keys s{shard}_{i}); sample s1_3 is corrupt."""
    root = tmp_path / "shards"
    root.mkdir()
    for shard in range(3):
        keys = [f"s{shard}_{i:02d}" for i in range(10)]
        write_shard(root / f"train-{shard:06d}.tar.gz", keys, corrupt={"s1_03"})
    return root
