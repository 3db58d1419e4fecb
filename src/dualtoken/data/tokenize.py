"""Tokenize a data set at scale: sharded token files an MLLM trains on, resumable, one or many processes.

The source is cut into *units*: ``shard_size`` consecutive images of a folder or file list, or one WebDataset
tar shard. Unit ``u`` is encoded by rank ``u % world_size`` into ``tokens-{u:06d}-{part:04d}.safetensors``
(``dualtoken.tokenfile`` format, at most ``shard_size`` images each) and then marked done by
``tokens-{u:06d}.done`` (JSON). A resumed run skips units marked done, so the output never depends on how many
processes wrote it or how often the job was interrupted. Rank 0 finally writes ``manifest.json``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from tqdm import tqdm

from ..errors import DataError, ImageError
from ..io import read_ahead
from ..process_group import in_process_group, join_process_group
from ..tokenfile import save_tokens
from .images import decode_record, warn_skipped
from .sources import IndexedSource, Record, RecordSource, ShardSource, resolve_source

MANIFEST_NAME = "manifest.json"


def _chunk_records(chunk: list[tuple[str, str]]) -> Iterator[Record]:
    return (Record(image_id, path) for image_id, path in chunk)


def _unit_records(source: RecordSource, shard_size: int) -> list[Callable[[], Iterator[Record]]]:
    """One zero-argument reader of records per unit (picklable, for data-loader workers)."""
    if isinstance(source, IndexedSource):
        items = source.items
        return [
            partial(_chunk_records, items[start : start + shard_size])
            for start in range(0, len(items), shard_size)
        ]
    if isinstance(source, ShardSource):
        return [partial(source.shard_records, url, 0, 0, False, 0, 1) for url in source.urls]
    raise DataError(f"{source.spec}: cannot be tokenized (unknown source type {type(source).__name__})")


class _UnitBatches(IterableDataset):
    """Decoded batches ``{"unit", "images", "ids", "skipped", "last"}`` of the units given, split over workers."""

    def __init__(self, readers: dict[int, Any], size: tuple[int, int], batch_size: int) -> None:
        self.readers = readers
        self.size = size
        self.batch_size = batch_size

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        units = sorted(self.readers)
        if info is not None:
            units = units[info.id :: info.num_workers]
        for unit in units:
            images, ids, skipped = [], [], []
            for record in self.readers[unit]():
                try:
                    images.append(decode_record(record, self.size))
                    ids.append(record.id)
                except ImageError as exc:
                    skipped.append((record.id, str(exc)))
                if len(images) == self.batch_size:
                    yield {
                        "unit": unit,
                        "images": torch.stack(images),
                        "ids": ids,
                        "skipped": skipped,
                        "last": False,
                    }
                    images, ids, skipped = [], [], []
            batch = torch.stack(images) if images else None
            yield {"unit": unit, "images": batch, "ids": ids, "skipped": skipped, "last": True}


def _done_path(out_dir: Path, unit: int) -> Path:
    return out_dir / f"tokens-{unit:06d}.done"


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    os.replace(tmp, path)


class _UnitWriter:
    """Collects one unit's codes and writes its parts of at most ``shard_size`` images, then the done marker."""

    def __init__(
        self, out_dir: Path, unit: int, shard_size: int, model: str, sizes: tuple[int, int], source: str | None
    ) -> None:
        self.out_dir, self.unit, self.shard_size, self.model, self.sizes, self.source = (
            out_dir,
            unit,
            shard_size,
            model,
            sizes,
            source,
        )
        self.pixel: list[torch.Tensor] = []
        self.semantic: list[torch.Tensor] = []
        self.ids: list[str] = []
        self.files: list[str] = []
        self.images = 0
        self.skipped: list[str] = []

    def add(self, pixel: torch.Tensor, semantic: torch.Tensor, ids: list[str]) -> None:
        self.pixel.append(pixel.to(torch.int32).cpu())
        self.semantic.append(semantic.to(torch.int32).cpu())
        self.ids.extend(ids)
        while len(self.ids) >= self.shard_size:
            self._flush(self.shard_size)

    def _flush(self, count: int) -> None:
        pixel, semantic = torch.cat(self.pixel), torch.cat(self.semantic)  # (n, h, w, Q)
        name = f"tokens-{self.unit:06d}-{len(self.files):04d}.safetensors"
        save_tokens(
            self.out_dir / name,
            pixel[:count],
            semantic[:count],
            self.ids[:count],
            self.model,
            self.sizes,
            self.source,
        )
        self.files.append(name)
        self.images += count
        self.pixel, self.semantic, self.ids = [pixel[count:]], [semantic[count:]], self.ids[count:]

    def finish(self, source: str) -> dict[str, Any]:
        if self.ids:
            self._flush(len(self.ids))
        summary = {"unit": self.unit, "source": source, "images": self.images, "skipped": self.skipped}
        _write_json(_done_path(self.out_dir, self.unit), {**summary, "files": self.files})
        return summary


def encode_dataset(
    tokenizer,
    source: str,
    out_dir: str,
    shard_size: int = 10000,
    batch_size: int = 32,
    resume: bool = True,
    *,
    num_workers: int = 0,
    progress: bool = True,
) -> dict:
    """Encode every image of ``source`` (folder, file list or WebDataset shards) into sharded token files.

    Under torchrun every rank encodes its own units (``unit % world_size == rank``; a gloo process group is made
    for the final counts when none exists); with ``resume`` units
    already marked done are skipped. Returns a summary: images and skipped counts, files written by this call,
    units done and reused. Unreadable images are skipped with a warning, listed in the done markers and counted.
    """
    if shard_size < 1 or batch_size < 1:
        raise DataError(f"shard_size and batch_size must be >= 1, got {shard_size} and {batch_size}")
    records = resolve_source(source)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    device = next(tokenizer.parameters()).device
    owns_group = join_process_group(device)
    rank, world = (dist.get_rank(), dist.get_world_size()) if in_process_group() else (0, 1)
    readers = _unit_records(records, shard_size)
    mine = {u: r for u, r in enumerate(readers) if u % world == rank}
    reused = [u for u in mine if resume and _done_path(out, u).is_file()]
    todo = {u: r for u, r in mine.items() if u not in reused}

    model = tokenizer.config.name
    sizes = (tokenizer.codebook_size("pixel"), tokenizer.codebook_size("semantic"))
    was_training = tokenizer.training
    tokenizer.eval()
    loader = DataLoader(
        _UnitBatches(todo, tokenizer.image_size, batch_size),
        batch_size=None,
        num_workers=min(num_workers, len(todo)),
        generator=torch.Generator(),
    )
    writers: dict[int, _UnitWriter] = {}
    summaries, files = [], []
    bar = tqdm(total=len(todo), desc=f"encode (rank {rank})", unit="unit", disable=not progress or not todo)
    for batch in read_ahead(loader) if loader.num_workers == 0 else loader:  # the next batch read meanwhile
        unit = batch["unit"]
        writer = writers.setdefault(
            unit, _UnitWriter(out, unit, shard_size, model, sizes, tokenizer.name_or_path)
        )
        for image_id, reason in batch["skipped"]:
            writer.skipped.append(image_id)
            warn_skipped(image_id, reason)
        if batch["images"] is not None:
            tokens = tokenizer.encode(batch["images"].to(device))
            writer.add(tokens.pixel, tokens.semantic, batch["ids"])
        if batch["last"]:
            summaries.append(writers.pop(unit).finish(records.spec))
            files.extend(json.loads(_done_path(out, unit).read_text())["files"])
            bar.update(1)
    bar.close()
    tokenizer.train(was_training)

    counts = torch.tensor(
        [
            sum(s["images"] for s in summaries),
            sum(len(s["skipped"]) for s in summaries),
            len(summaries),
            len(reused),
        ]
    )
    if in_process_group():
        if dist.get_backend() == "nccl":
            counts = counts.to(device)
        dist.all_reduce(counts)
        dist.barrier()
        counts = counts.cpu()
    if rank == 0:
        _write_manifest(out, len(readers), model, sizes, records.spec)
    if owns_group:
        dist.destroy_process_group()
    images, skipped, done, kept = (int(c) for c in counts)
    return {
        "out_dir": str(out),
        "images": images,
        "skipped": skipped,
        "units": len(readers),
        "units_encoded": done,
        "units_reused": kept,
        "files": files,
    }


def _write_manifest(out: Path, units: int, model: str, sizes: tuple[int, int], spec: str) -> None:
    """``manifest.json``: every unit's files and counts, once all are done (units still missing are listed)."""
    done = {}
    for unit in range(units):
        path = _done_path(out, unit)
        if path.is_file():
            done[unit] = json.loads(path.read_text())
    _write_json(
        out / MANIFEST_NAME,
        {
            "source": spec,
            "model": model,
            "codebook_size": list(sizes),
            "images": sum(d["images"] for d in done.values()),
            "skipped": sum(len(d["skipped"]) for d in done.values()),
            "files": [f for unit in sorted(done) for f in done[unit]["files"]],
            "missing_units": [u for u in range(units) if u not in done],
        },
    )
