"""The images of an evaluation with their data index, id and class label, read through :mod:`dualtoken.data`.

Every process walks the whole record list (cheap: records are undecoded) and decodes only its own images
(index mod world size), so an image's index is its position in the data whatever the number of processes.
Labels come from a ``labels.tsv`` (``file``, ``class_index``) for folders and file lists, and from the ``cls``
member of each sample for WebDataset shards.
"""

from __future__ import annotations

import csv
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from ..data import RecordSource, decode_record
from ..errors import DataError, ImageError
from .distributed import rank_and_world

LABEL_KEYS = ("cls", "label", "class")
NO_LABEL = -1


@dataclass
class Batch:
    indices: torch.Tensor  # (B,) positions in the data
    ids: list[str]
    images: torch.Tensor | None  # (B, 3, H, W) in [-1, 1]; None when every image of the batch was unreadable
    labels: torch.Tensor  # (B,) class index, -1 when unknown
    skipped: list[tuple[int, str, str]]  # (index, id, reason) of unreadable images


def labels_from_tsv(path: Path) -> tuple[dict[str, int], dict[str, int]]:
    """labels.tsv (``file`` relative to its folder, ``class_index``) -> ({resolved path: class}, {file: class})."""
    with path.open(encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle, delimiter="\t"))
    if not rows or not {"file", "class_index"} <= set(rows[0]):
        raise DataError(f"{path}: expected a TSV with columns 'file' and 'class_index'")
    by_path = {str((path.parent / row["file"]).resolve()): int(row["class_index"]) for row in rows}
    return by_path, {row["file"]: int(row["class_index"]) for row in rows}


def _labels_from_shards(urls: list[str]) -> dict[str, int]:
    """{sample key: class} from the ``cls`` members of WebDataset shards (empty when they hold none)."""
    import webdataset as wds

    labels: dict[str, int] = {}
    dataset = wds.WebDataset(urls, shardshuffle=False, nodesplitter=None, workersplitter=None, empty_check=False)
    for sample in dataset:
        key = next((k for k in LABEL_KEYS if k in sample), None)
        if key is not None:
            labels[sample["__key__"]] = int(bytes(sample[key]).decode().strip())
    return labels


def find_beside(spec: str, names: tuple[str, ...]) -> Path | None:
    """A file named one of ``names`` in the data folder (or the shards' folder) or its parent."""
    path = Path(spec.split("{")[0].split("*")[0])
    folder = path if path.is_dir() else path.parent
    for candidate in (folder, folder.parent):
        for name in names:
            if (candidate / name).is_file():
                return candidate / name
    return None


class LabelLookup:
    """Class label of a record: by resolved file path (label TSV), else by record id (a shard's sample key, or
    the ``file`` column of a label TSV given for shards)."""

    def __init__(self, source: RecordSource, labels_path: str | Path | None) -> None:
        self.by_path: dict[str, int] = {}
        self.by_key: dict[str, int] = {}
        self.origin: str | None = None
        if labels_path is None and hasattr(source, "urls"):
            self.by_key = _labels_from_shards(source.urls)
            self.origin = "cls members of the shards" if self.by_key else None
            return
        path = Path(labels_path) if labels_path is not None else find_beside(source.spec, ("labels.tsv",))
        if path is not None:
            self.by_path, self.by_key = labels_from_tsv(path)
            self.origin = str(path)

    @property
    def available(self) -> bool:
        return bool(self.by_path or self.by_key)

    def __call__(self, record_id: str, payload: str | bytes) -> int:
        if isinstance(payload, str) and self.by_path:
            label = self.by_path.get(str(Path(payload).resolve()), NO_LABEL)
            if label != NO_LABEL:
                return label
        return self.by_key.get(record_id, NO_LABEL)


class EvalSamples(IterableDataset):
    """This process's images as dicts {index, id, image | None, label, error}; DataLoader workers split them.

    Images in ``done`` are passed over undecoded (a resumed run)."""

    def __init__(
        self, source: RecordSource, size: tuple[int, int], labels: LabelLookup, limit: int | None, done: set[int]
    ) -> None:
        self.source = source
        self.size = size
        self.labels = labels
        self.limit = limit
        self.done = frozenset(done)  # indices evaluated before an interruption
        self.rank, self.world = rank_and_world()

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        for index, (record, _) in enumerate(self.source.walk()):
            if self.limit is not None and index >= self.limit:
                return
            if index % self.world != self.rank or (index // self.world) % workers != worker or index in self.done:
                continue
            item = {"index": index, "id": record.id, "label": self.labels(record.id, record.payload)}
            try:
                item["image"], item["error"] = decode_record(record, self.size), None
            except ImageError as exc:
                item["image"], item["error"] = None, str(exc)
            yield item


def collate(items: list[dict]) -> Batch:
    good = [item for item in items if item["image"] is not None]
    return Batch(
        indices=torch.tensor([item["index"] for item in good], dtype=torch.long),
        ids=[item["id"] for item in good],
        images=torch.stack([item["image"] for item in good]) if good else None,
        labels=torch.tensor([item["label"] for item in good], dtype=torch.long),
        skipped=[(item["index"], item["id"], item["error"]) for item in items if item["image"] is None],
    )


def eval_loader(
    source: RecordSource, size: tuple[int, int], labels: LabelLookup, limit: int | None, batch_size: int,
    num_workers: int, done: set[int],
) -> DataLoader:
    """A DataLoader of :class:`Batch` es over this process's images of ``source`` not in ``done``."""
    dataset = EvalSamples(source, size, labels, limit, done)
    return DataLoader(dataset, batch_size=batch_size, num_workers=num_workers, collate_fn=collate)


def count_images(source: RecordSource, limit: int | None) -> int | None:
    """Images in the data when known without reading it (folders and file lists), capped by ``limit``."""
    try:
        total = len(source)  # type: ignore[arg-type]
    except TypeError:
        return limit
    return total if limit is None else min(total, limit)
