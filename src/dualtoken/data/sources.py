"""Where images come from: a recursive image folder, a file list, or WebDataset tar shards.

Every source is read as a sequence of undecoded :class:`Record` s split into *streams* (one per process and
data-loader worker) and walked from a :class:`Position` (epoch, shard, offset), so any reader can stop and later
continue exactly where it was. Decoding happens after a record is chosen, so skipping costs no image decoding.

- Indexed sources (folders, file lists): one virtual shard per epoch, a permutation of all items (seeded by
  epoch) when shuffling; stream ``s`` of ``n`` takes every n-th item from ``s``.
- Shard sources (WebDataset ``.tar`` / ``.tar.gz``): shard order permuted per epoch when shuffling; with at least
  as many shards as streams, stream ``s`` reads shards ``s, s + n, ...``; with fewer, every stream reads every
  shard and keeps every n-th sample. Shuffling inside a shard uses a buffer seeded by (seed, epoch, shard) that
  is drained at the end of the shard, so a position inside a shard is reproducible by replaying that shard.
"""

from __future__ import annotations

import glob
import random
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from ..errors import DataError, ImageError
from ..io import IMAGE_SUFFIXES, list_images

LIST_SUFFIXES = (".txt", ".lst", ".list", ".tsv")
SHARD_SUFFIXES = (".tar", ".tar.gz", ".tgz")
# keys of a WebDataset sample that may hold the image, in order of preference
SHARD_IMAGE_KEYS = ("jpg", "jpeg", "png", "webp", "bmp", "tif", "tiff", "ppm", "image")


@dataclass(frozen=True)
class Record:
    """One undecoded image: its id and either a file path or the encoded bytes."""

    id: str
    payload: str | bytes


@dataclass(frozen=True)
class Position:
    """Where a stream stands: the next record is number ``offset`` of shard ``shard`` of epoch ``epoch``."""

    epoch: int = 0
    shard: int = 0
    offset: int = 0

    def to_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "shard": self.shard, "offset": self.offset}

    @classmethod
    def from_dict(cls, data: dict[str, int]) -> Position:
        return cls(int(data["epoch"]), int(data["shard"]), int(data["offset"]))


def _permutation(count: int, seed: int, epoch: int) -> list[int]:
    order = list(range(count))
    random.Random(f"order/{seed}/{epoch}").shuffle(order)
    return order


class RecordSource(ABC):
    """A readable set of images: walk its records for one stream from a position."""

    spec: str

    @abstractmethod
    def stream_shards(self, epoch: int, seed: int, shuffle: bool, stream: int, num_streams: int) -> list:
        """The shards stream ``stream`` reads in ``epoch``, in order (opaque handles for :meth:`shard_records`)."""

    @abstractmethod
    def shard_records(
        self, shard, epoch: int, seed: int, shuffle: bool, stream: int, num_streams: int
    ) -> Iterator[Record]:
        """The records of one shard this stream keeps, in reading order."""

    def walk(
        self,
        start: Position = Position(),
        *,
        seed: int = 0,
        shuffle: bool = False,
        stream: int = 0,
        num_streams: int = 1,
        repeat: bool = False,
    ) -> Iterator[tuple[Record, Position]]:
        """Records from ``start`` with the position after each; one epoch, or forever when ``repeat``."""
        epoch, first_shard, skip = start.epoch, start.shard, start.offset
        while True:
            whole_epoch, yielded = first_shard == 0 and skip == 0, 0
            shards = self.stream_shards(epoch, seed, shuffle, stream, num_streams)
            for index in range(first_shard, len(shards)):
                records = self.shard_records(shards[index], epoch, seed, shuffle, stream, num_streams)
                for offset, record in enumerate(records):
                    if offset < skip:
                        continue
                    yielded += 1
                    yield record, Position(epoch, index, offset + 1)
                skip = 0
            if not repeat:
                return
            if whole_epoch and not yielded:
                raise DataError(f"{self.spec}: stream {stream} of {num_streams} has no images to read")
            epoch, first_shard, skip = epoch + 1, 0, 0


class IndexedSource(RecordSource):
    """Images known by path up front (a folder or a file list): one virtual shard per epoch."""

    def __init__(self, spec: str, items: list[tuple[str, str]]) -> None:
        if not items:
            raise DataError(
                f"{spec}: no images found (expected image files such as {', '.join(IMAGE_SUFFIXES[:4])})"
            )
        self.spec = spec
        self.items = items  # (id, path)

    def __len__(self) -> int:
        return len(self.items)

    def stream_shards(self, epoch: int, seed: int, shuffle: bool, stream: int, num_streams: int) -> list:
        order = _permutation(len(self.items), seed, epoch) if shuffle else range(len(self.items))
        return [list(order)[stream::num_streams]]

    def shard_records(self, shard, epoch, seed, shuffle, stream, num_streams) -> Iterator[Record]:
        for index in shard:
            item_id, path = self.items[index]
            yield Record(item_id, path)


def _image_key(sample: dict) -> str | None:
    for key in SHARD_IMAGE_KEYS:
        if key in sample:
            return key
    return None


class ShardSource(RecordSource):
    """WebDataset tar shards (optionally gzip'd), read with the ``webdataset`` package, images undecoded."""

    def __init__(self, spec: str, urls: list[str], shuffle_buffer: int = 1000) -> None:
        if not urls:
            raise DataError(
                f"{spec}: no WebDataset shards matched (expected e.g. /data/train-{{000000..000009}}.tar)"
            )
        self.spec = spec
        self.urls = urls
        self.shuffle_buffer = shuffle_buffer

    def stream_shards(self, epoch: int, seed: int, shuffle: bool, stream: int, num_streams: int) -> list:
        order = _permutation(len(self.urls), seed, epoch) if shuffle else list(range(len(self.urls)))
        if len(self.urls) >= num_streams:
            order = order[stream::num_streams]
        return [self.urls[i] for i in order]

    def _read(self, url: str) -> Iterator[dict]:
        import webdataset as wds

        dataset = wds.WebDataset(
            [url], shardshuffle=False, nodesplitter=None, workersplitter=None, empty_check=False
        )
        yield from dataset

    def shard_records(self, shard, epoch, seed, shuffle, stream, num_streams) -> Iterator[Record]:
        split_samples = len(self.urls) < num_streams
        kept = (
            Record(sample["__key__"], sample[key])
            if (key := _image_key(sample))
            else Record(sample["__key__"], b"")
            for index, sample in enumerate(self._read(shard))
            if not split_samples or index % num_streams == stream
        )
        if not shuffle or self.shuffle_buffer <= 1:
            yield from kept
            return
        rng = random.Random(f"buffer/{seed}/{epoch}/{shard}")
        buffer: list[Record] = []
        for record in kept:
            if len(buffer) < self.shuffle_buffer:
                buffer.append(record)
                continue
            pick = rng.randrange(len(buffer))
            yield buffer[pick]
            buffer[pick] = record
        rng.shuffle(buffer)
        yield from buffer


def _list_folder(folder: Path) -> list[tuple[str, str]]:
    """(path relative to the folder, path) of every image below it; empty when there is none."""
    try:
        paths = list_images(folder)
    except ImageError:
        return []
    return [(p.relative_to(folder).as_posix(), str(p)) for p in paths]


def _read_file_list(path: Path) -> list[tuple[str, str]]:
    """One image path or image folder per line (relative to the list's folder); '#' comments and blank lines are
    skipped.

    A tab-separated file whose header names a ``file`` or ``path`` column reads that column.
    """
    lines = [line.rstrip("\n") for line in path.read_text().splitlines()]
    lines = [line for line in lines if line.strip() and not line.lstrip().startswith("#")]
    column = 0
    if lines and "\t" in lines[0]:
        header = lines[0].split("\t")
        names = [name for name in ("file", "path") if name in header]
        if names:
            column = header.index(names[0])
            lines = lines[1:]
    items = []
    for line in lines:
        entry = line.split("\t")[column].strip()
        target = Path(entry) if Path(entry).is_absolute() else path.parent / entry
        if target.is_dir():  # a folder stands for every image below it
            items.extend((f"{entry}/{item_id}", item_path) for item_id, item_path in _list_folder(target))
        else:
            items.append((entry, str(target)))
    return items


def _expand_shards(spec: str) -> list[str]:
    from braceexpand import braceexpand

    urls: list[str] = []
    for pattern in braceexpand(spec):
        matches = sorted(glob.glob(pattern)) if any(c in pattern for c in "*?[") else [pattern]
        urls.extend(matches)
    missing = [u for u in urls if "://" not in u and not u.startswith("pipe:") and not Path(u).is_file()]
    if missing:
        raise DataError(f"{spec}: shard file(s) not found: {missing[:3]}")
    return urls


def _is_shard_name(name: str) -> bool:
    return name.lower().endswith(SHARD_SUFFIXES)


def resolve_source(spec: str | Path, shuffle_buffer: int = 1000) -> RecordSource:
    """The record source a spec names.

    - a folder: its images, recursively (or its ``.tar``/``.tar.gz`` shards when it holds no images);
    - a ``.txt``/``.lst``/``.tsv`` file: a file list;
    - a single image file: that image;
    - anything naming ``.tar``/``.tar.gz`` files, with ``{000..009}`` brace ranges or ``*`` globs: WebDataset shards.
    """
    text = str(spec)
    path = Path(text)
    if path.is_dir():
        items = _list_folder(path)
        if items:
            return IndexedSource(text, items)
        shards = sorted(str(p) for p in path.rglob("*") if p.is_file() and _is_shard_name(p.name))
        if shards:
            return ShardSource(text, shards, shuffle_buffer)
        return IndexedSource(text, items)
    if path.is_file() and path.suffix.lower() in LIST_SUFFIXES:
        return IndexedSource(text, _read_file_list(path))
    if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES:
        return IndexedSource(text, [(path.name, text)])
    if _is_shard_name(text) or ".tar" in text:
        return ShardSource(text, _expand_shards(text), shuffle_buffer)
    if not path.exists():
        raise DataError(f"data source not found: {text}")
    raise DataError(
        f"{text}: not a data source (expected an image folder, a .txt/.lst/.tsv file list, an image file, "
        "or WebDataset shards such as train-{000000..000009}.tar)"
    )
