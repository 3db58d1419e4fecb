"""Endless, shuffled, resumable training batches for one process (and its data-loader workers).

Each (rank, worker) pair reads its own stream of the source (see :mod:`.sources`) and builds whole batches of
``batch_size`` decodable images; unreadable ones are skipped, reported in the batch and counted, and do not
shorten it. The loader remembers the position after the last batch it *handed out* for every stream, so
``state_dict()`` / ``load_state_dict()`` resume exactly, whatever the workers had prefetched. Crops are seeded
per image (seed, epoch, id), so single-process and multi-process runs see the same crops.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from ..errors import ImageError
from .images import decode_record, warn_skipped
from .sources import Position, RecordSource


class TrainBatches(IterableDataset):
    """Batches ``{"images" (B,3,H,W), "ids", "skipped" [(id, reason)], "stream", "position"}`` forever."""

    def __init__(
        self,
        records: RecordSource,
        size: tuple[int, int],
        batch_size: int,
        seed: int,
        rank: int,
        world_size: int,
        workers: int,
        positions: dict[int, Position],
        rotation: int,
        crop_scale: tuple[float, float],
    ) -> None:
        self.records = records
        self.size = size
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.workers = workers
        self.positions = positions
        self.rotation = rotation
        self.crop_scale = crop_scale

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        local = ((info.id if info else 0) + self.rotation) % self.workers
        walk = self.records.walk(
            self.positions.get(local, Position()),
            seed=self.seed,
            shuffle=True,
            stream=self.rank * self.workers + local,
            num_streams=self.world_size * self.workers,
            repeat=True,
        )
        images, ids, skipped = [], [], []
        for record, after in walk:
            try:
                images.append(decode_record(record, self.size, True, self.seed, after.epoch, self.crop_scale))
                ids.append(record.id)
            except ImageError as exc:
                skipped.append((record.id, str(exc)))
            if len(images) == self.batch_size:
                batch = torch.stack(images)  # (B, 3, H, W)
                yield {"images": batch, "ids": ids, "skipped": skipped, "stream": local, "position": after}
                images, ids, skipped = [], [], []


class TrainLoader:
    """Iterator of training batches for this process, with an exact, resumable data position."""

    def __init__(
        self,
        records: RecordSource,
        size: tuple[int, int],
        batch_size: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        num_workers: int = 0,
        crop_scale: tuple[float, float] = (0.9, 1.0),
        pin_memory: bool = False,
    ) -> None:
        self.records = records
        self.size = size
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.num_workers = num_workers
        self.crop_scale = crop_scale
        self.pin_memory = pin_memory
        self.positions: dict[int, Position] = {}
        self.batches = 0  # batches handed out since the start of training
        self.skipped = 0
        self._iterator: Iterator[dict[str, Any]] | None = None

    @property
    def streams(self) -> int:
        return max(1, self.num_workers)

    @property
    def epoch(self) -> int:
        """The epoch the slowest stream of this process is in."""
        return min((p.epoch for p in self.positions.values()), default=0)

    def _start(self) -> Iterator[dict[str, Any]]:
        dataset = TrainBatches(
            self.records,
            self.size,
            self.batch_size,
            self.seed,
            self.rank,
            self.world_size,
            self.streams,
            dict(self.positions),
            self.batches % self.streams,
            self.crop_scale,
        )
        loader = DataLoader(
            dataset,
            batch_size=None,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=False,
            generator=torch.Generator(),  # never draws from the default generator the model uses
        )
        return iter(loader)

    def __iter__(self) -> TrainLoader:
        return self

    def __next__(self) -> dict[str, Any]:
        if self._iterator is None:
            self._iterator = self._start()
        batch = next(self._iterator)
        self.positions[batch["stream"]] = batch["position"]
        self.batches += 1
        for image_id, reason in batch["skipped"]:
            self.skipped += 1
            warn_skipped(image_id, reason)
        return batch

    def state_dict(self) -> dict[str, Any]:
        return {
            "positions": {str(k): p.to_dict() for k, p in self.positions.items()},
            "streams": self.streams,
            "world_size": self.world_size,
            "batches": self.batches,
            "skipped": self.skipped,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a saved position; with another world size or worker count, restart the saved epoch."""
        self._iterator = None
        self.batches = int(state["batches"])
        self.skipped = int(state["skipped"])
        positions = {int(k): Position.from_dict(v) for k, v in state["positions"].items()}
        if state["streams"] == self.streams and state["world_size"] == self.world_size:
            self.positions = positions
            return
        epoch = min((p.epoch for p in positions.values()), default=0)
        self.positions = {s: Position(epoch) for s in range(self.streams)}
        warnings.warn(
            f"data position saved with {state['world_size']} process(es) x {state['streams']} stream(s), now "
            f"{self.world_size} x {self.streams}: restarting epoch {epoch}",
            RuntimeWarning,
            stacklevel=2,
        )
