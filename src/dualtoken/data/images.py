"""Reading a data source as image tensors: ``open_image_source(spec, size)`` yields ``(image, id)``.

Unreadable images (corrupt, truncated, not an image) are skipped with a :class:`SkippedImageWarning` and counted
in ``skipped`` / ``skipped_ids``; they never end a long run.
"""

from __future__ import annotations

import io
import random
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch

from ..errors import DataError, ImageError
from ..io import open_rgb
from .sources import IndexedSource, Position, Record, RecordSource, resolve_source
from .transforms import eval_transform, train_transform


class SkippedImageWarning(UserWarning):
    """An image of a data source could not be decoded and was skipped."""


def warn_skipped(image_id: str, reason: str) -> None:
    """One SkippedImageWarning: "unreadable input ID: REASON" (a reason repeating the id is not repeated)."""
    reason = reason.removeprefix(f"{image_id}: ")
    warnings.warn(f"unreadable input {image_id}: {reason}", SkippedImageWarning, stacklevel=2)


def decode_record(
    record: Record,
    size: tuple[int, int],
    train: bool = False,
    seed: int = 0,
    epoch: int = 0,
    crop_scale: tuple[float, float] = (0.9, 1.0),
) -> torch.Tensor:
    """A record as a (3, H, W) tensor in [-1, 1]: train crop (seeded by seed, epoch and id) or eval crop.

    Raises ImageError when the record does not decode.
    """
    return decode_crops(record, size, 1, train, seed, epoch, crop_scale)[0]


def decode_crops(
    record: Record,
    size: tuple[int, int],
    crops: int,
    train: bool = True,
    seed: int = 0,
    first_epoch: int = 0,
    crop_scale: tuple[float, float] = (0.9, 1.0),
) -> list[torch.Tensor]:
    """The training crops of epochs ``first_epoch .. first_epoch + crops - 1`` of a record, decoded once (the crops
    :func:`decode_record` gives for those epochs); without ``train`` the one eval crop. Raises ImageError when the
    record does not decode."""
    if isinstance(record.payload, bytes) and not record.payload:
        raise ImageError("the sample holds no image (expected a jpg/png/webp/... member)")
    payload = record.payload
    image = open_rgb(io.BytesIO(payload) if isinstance(payload, bytes) else payload)
    if not train:
        return [eval_transform(image, size)]
    return [
        train_transform(image, size, random.Random(f"crop/{seed}/{epoch}/{record.id}"), scale=crop_scale)
        for epoch in range(first_epoch, first_epoch + crops)
    ]


def _as_size(size: int | tuple[int, int]) -> tuple[int, int]:
    if isinstance(size, int):
        return (size, size)
    if len(size) != 2 or min(size) < 1:
        raise DataError(f"image size must be an int or (height, width), got {size!r}")
    return (int(size[0]), int(size[1]))


class ImageSource:
    """An iterable of ``(image (3, H, W) float in [-1, 1], id)`` over one data source.

    ``train=True`` shuffles (seeded by ``seed`` and ``epoch``) and applies the training crop; otherwise the order
    is the source's and the eval transform applies. ``rank`` / ``world_size`` read a disjoint part (for torchrun).
    """

    def __init__(
        self,
        records: RecordSource,
        size: tuple[int, int],
        train: bool = False,
        seed: int = 0,
        epoch: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if not 0 <= rank < world_size:
            raise DataError(f"rank {rank} is outside world size {world_size}")
        self.records = records
        self.size = size
        self.train = train
        self.seed = seed
        self.epoch = epoch
        self.rank = rank
        self.world_size = world_size
        self.skipped = 0
        self.skipped_ids: list[str] = []

    @property
    def spec(self) -> str:
        return self.records.spec

    def __len__(self) -> int:
        """Images this rank reads (known up front for folders and file lists only)."""
        if not isinstance(self.records, IndexedSource):
            raise TypeError(
                f"{self.spec}: the number of images in WebDataset shards is not known before reading"
            )
        return len(range(self.rank, len(self.records), self.world_size))

    def __iter__(self) -> Iterator[tuple[torch.Tensor, str]]:
        walk = self.records.walk(
            Position(self.epoch),
            seed=self.seed,
            shuffle=self.train,
            stream=self.rank,
            num_streams=self.world_size,
        )
        for record, _ in walk:
            try:
                image = decode_record(record, self.size, self.train, self.seed, self.epoch)
            except ImageError as exc:
                self.skipped += 1
                self.skipped_ids.append(record.id)
                warn_skipped(record.id, str(exc))
                continue
            yield image, record.id


def open_image_source(
    spec: str | Path,
    size: int | tuple[int, int],
    train: bool = False,
    *,
    seed: int = 0,
    epoch: int = 0,
    rank: int = 0,
    world_size: int = 1,
    shuffle_buffer: int = 1000,
) -> ImageSource:
    """Open an image folder (recursive), a file list (.txt/.lst/.tsv), an image file, or WebDataset shards
    (``/data/train-{000000..000001}.tar.gz``) as an iterable of ``(image, id)``.

    Images come out as float tensors (3, H, W) in [-1, 1] at ``size`` (int or (H, W)); a missing or empty source
    raises DataError, an unreadable image is skipped with a warning and counted.
    """
    return ImageSource(
        resolve_source(spec, shuffle_buffer),
        _as_size(size),
        train=train,
        seed=seed,
        epoch=epoch,
        rank=rank,
        world_size=world_size,
    )
