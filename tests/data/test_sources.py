"""Data sources: folders, file lists, shards; rank splits; corrupt images skipped and counted; exact resume."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch

from dualtoken.data import SkippedImageWarning, TrainLoader, open_image_source, resolve_source
from dualtoken.errors import DataError


def _read(source) -> list[str]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SkippedImageWarning)
        return [image_id for _, image_id in source]


def test_folder_yields_images_in_range_and_skips_corrupt(image_folder: Path):
    source = open_image_source(image_folder, (16, 24))
    with pytest.warns(SkippedImageWarning, match="broken.png"):
        items = list(source)
    assert [i for _, i in items] == sorted(i for _, i in items)
    assert len(items) == 12 and source.skipped == 1 and source.skipped_ids == ["b/broken.png"]
    image = items[0][0]
    assert image.shape == (3, 16, 24) and image.dtype == torch.float32
    assert -1.0 <= float(image.min()) and float(image.max()) <= 1.0


def test_file_list_relative_paths_and_comments(image_folder: Path):
    listing = image_folder / "list.txt"
    listing.write_text("# two images\na/img00.png\n\nb/img07.png\n")
    assert _read(open_image_source(listing, 8)) == ["a/img00.png", "b/img07.png"]


def test_brace_pattern_reads_shards_and_skips_corrupt_member(shard_folder: Path):
    spec = str(shard_folder / "train-{000000..000002}.tar.gz")
    source = open_image_source(spec, 8)
    ids = _read(source)
    assert len(ids) == 29 and source.skipped_ids == ["s1_03"]
    assert _read(open_image_source(shard_folder, 8)) == ids  # a folder of shards is the same source


def test_ranks_split_disjoint_and_complete(image_folder: Path, shard_folder: Path):
    for spec in (image_folder, shard_folder):
        everything = _read(open_image_source(spec, 8))
        parts = [_read(open_image_source(spec, 8, rank=r, world_size=2)) for r in range(2)]
        assert not set(parts[0]) & set(parts[1])
        assert sorted(parts[0] + parts[1]) == sorted(everything)


def test_train_order_is_shuffled_and_seeded(image_folder: Path):
    first = _read(open_image_source(image_folder, 8, train=True, seed=1))
    assert first == _read(open_image_source(image_folder, 8, train=True, seed=1))
    assert first != _read(open_image_source(image_folder, 8, train=True, seed=2))
    assert sorted(first) == sorted(_read(open_image_source(image_folder, 8)))


def test_bad_specs_raise_data_error(tmp_path: Path):
    with pytest.raises(DataError, match="not found"):
        open_image_source(tmp_path / "missing", 8)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no images"):
        open_image_source(tmp_path / "empty", 8)
    with pytest.raises(DataError, match="not found"):
        open_image_source(str(tmp_path / "x-{000..001}.tar"), 8)


def _batches(loader: TrainLoader, count: int) -> list[torch.Tensor]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SkippedImageWarning)
        return [next(loader)["images"] for _ in range(count)]


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("kind", ["folder", "shards"])
def test_train_loader_resumes_exactly(image_folder: Path, shard_folder: Path, workers: int, kind: str):
    records = resolve_source(image_folder if kind == "folder" else shard_folder, shuffle_buffer=4)
    make = lambda: TrainLoader(records, (8, 8), batch_size=5, seed=3, num_workers=workers)  # noqa: E731
    straight = _batches(make(), 9)  # crosses epoch boundaries (12 or 29 images)
    first = make()
    head = _batches(first, 4)
    resumed = make()
    resumed.load_state_dict(first.state_dict())
    tail = _batches(resumed, 5)
    for a, b in zip(straight, head + tail):
        assert torch.equal(a, b)
    assert first.skipped + resumed.skipped >= 1  # the corrupt file was met and counted, batches stayed full


def test_train_loader_ranks_together_see_the_single_process_batch(image_folder: Path):
    records = resolve_source(image_folder)
    single = _batches(TrainLoader(records, (8, 8), batch_size=4, seed=0), 1)[0]
    halves = [_batches(TrainLoader(records, (8, 8), 2, seed=0, rank=r, world_size=2), 1)[0] for r in range(2)]
    together = torch.stack([halves[0], halves[1]], dim=1).flatten(
        0, 1
    )  # interleave: ranks take every 2nd item
    assert torch.equal(single, together)
