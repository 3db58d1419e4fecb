"""Training images held on the accelerator: a packed file of small encoded images, decoded once into one uint8
tensor on the device, and random resized crops cut there for every batch, so that CPU cores never bound a step.

    pack_images(paths, out)          -> one file: each image at most ``short_side`` on its shorter side, WebP bytes
    read_packed(out, workers)        -> decoded uint8 images (3, h, w), in parallel processes
    DeviceCropLoader(images, ...)    -> batches {"images": (B, 3, S, S) in [-1, 1]} on the device

The crops follow the release's training transform (random area in ``crop_scale``, aspect ratio in [3/4, 4/3],
bicubic resampling); the loader's state has the :class:`~dualtoken.data.TrainLoader` form, so a run that starts
on the device resumes with the file loader on a CPU (which then restarts the saved epoch).
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

from ..errors import DataError, ImageError
from ..io import open_rgb
from .sources import Position

PACK_FORMAT = 1


def shrink(image: Image.Image, short_side: int, max_aspect: float) -> Image.Image:
    """At most ``short_side`` on the shorter side (never enlarged; bicubic), the longer side centre-cropped to at
    most ``max_aspect`` times the shorter."""
    scale = min(1.0, short_side / min(image.size))
    if scale < 1.0:
        image = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))), Image.BICUBIC)
    width, height = image.size
    longest = int(min(width, height) * max_aspect)
    left, top = max(0, (width - longest) // 2), max(0, (height - longest) // 2)
    return image.crop((left, top, left + min(width, longest), top + min(height, longest)))


def encode_image(path: str, short_side: int, max_aspect: float, quality: int) -> bytes | None:
    """One image file as WebP bytes after :func:`shrink`; None when the file is not a readable image."""
    try:
        image = shrink(open_rgb(path), short_side, max_aspect)
    except ImageError:
        return None
    buffer = io.BytesIO()
    image.save(buffer, "WEBP", quality=quality, method=4)
    return buffer.getvalue()


def pack_images(
    paths: Sequence[str],
    out: str | Path,
    short_side: int = 256,
    max_aspect: float = 1.25,
    quality: int = 50,
    workers: int = 1,
    progress: bool = True,
) -> dict[str, Any]:
    """Encode ``paths`` into one file (written atomically); returns its summary (count, bytes, settings)."""
    jobs = [(str(p), short_side, max_aspect, quality) for p in paths]
    with ProcessPoolExecutor(workers) if workers > 1 else _Serial() as pool:
        encoded = list(tqdm(pool.map(encode_image, *zip(*jobs)), total=len(jobs), desc="pack", disable=not progress))
    kept = [(str(p), data) for p, data in zip(paths, encoded) if data is not None]
    if not kept:
        raise DataError("no readable image to pack")
    summary = {
        "format": PACK_FORMAT,
        "count": len(kept),
        "skipped": len(paths) - len(kept),
        "short_side": short_side,
        "max_aspect": max_aspect,
        "quality": quality,
        "bytes": sum(len(data) for _, data in kept),
    }
    state = {**summary, "ids": [p for p, _ in kept], "images": [torch.frombuffer(bytearray(d), dtype=torch.uint8) for _, d in kept]}
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    torch.save(state, tmp)
    tmp.replace(out)
    return summary


def _decode(data: bytes) -> np.ndarray:
    return np.array(Image.open(io.BytesIO(data)).convert("RGB"))


def read_packed(path: str | Path, workers: int = 1, progress: bool = True) -> list[torch.Tensor]:
    """The images of a packed file, decoded: uint8 (3, h, w) each."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    if state.get("format") != PACK_FORMAT:
        raise DataError(f"{path} is not a packed image file of format {PACK_FORMAT}")
    payloads = [bytes(t.numpy()) for t in state["images"]]
    with ProcessPoolExecutor(workers) if workers > 1 else _Serial() as pool:
        arrays = list(tqdm(pool.map(_decode, payloads, chunksize=64), total=len(payloads), desc="decode", disable=not progress))
    return [torch.from_numpy(a).permute(2, 0, 1).contiguous() for a in arrays]


class _Serial:
    """The ``map`` of an executor, run in this process."""

    def __enter__(self) -> _Serial:
        return self

    def __exit__(self, *exc) -> None:
        return None

    @staticmethod
    def map(fn, *iterables, chunksize: int = 1):
        return map(fn, *iterables)


class DeviceCropLoader:
    """Batches of random resized crops of images held on ``device`` as one uint8 canvas (N, 3, Hmax, Wmax).

    Each image sits in the canvas's top-left corner with its last row and column repeated into the rest, so the
    bicubic kernel never reads padding. An epoch visits every image once in a seeded order; a batch never spans
    two epochs (the last partial batch of an epoch is dropped).
    """

    def __init__(
        self,
        images: Sequence[torch.Tensor],
        size: tuple[int, int],
        batch_size: int,
        device: torch.device | str = "cpu",
        seed: int = 0,
        crop_scale: tuple[float, float] = (0.9, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
    ) -> None:
        if len(images) < batch_size:
            raise DataError(f"{len(images)} images cannot fill a batch of {batch_size}")
        self.size, self.batch_size, self.seed = size, batch_size, seed
        self.crop_scale, self.ratio = crop_scale, ratio
        self.device = torch.device(device)
        height = max(image.shape[1] for image in images)
        width = max(image.shape[2] for image in images)
        self.canvas = torch.empty(len(images), 3, height, width, dtype=torch.uint8, device=self.device)
        self.sizes = torch.tensor([image.shape[1:] for image in images], dtype=torch.float32)  # (N, 2) h, w
        for index, image in enumerate(images):
            h, w = image.shape[1:]
            slot = self.canvas[index]
            slot[:, :h, :w] = image.to(self.device)
            slot[:, :h, w:] = slot[:, :h, w - 1 : w]
            slot[:, h:, :] = slot[:, h - 1 : h, :]
        self.position = Position()
        self.batches = 0
        self.skipped = 0
        self._order = self._epoch_order(0)

    @property
    def epoch(self) -> int:
        return self.position.epoch

    def _epoch_order(self, epoch: int) -> torch.Tensor:
        return torch.randperm(len(self.canvas), generator=torch.Generator().manual_seed(self.seed * 100003 + epoch))

    def __iter__(self) -> DeviceCropLoader:
        return self

    def __next__(self) -> dict[str, Any]:
        if self.position.offset + self.batch_size > len(self.canvas):
            self.position = Position(self.position.epoch + 1)
            self._order = self._epoch_order(self.position.epoch)
        start = self.position.offset
        index = self._order[start : start + self.batch_size]
        generator = torch.Generator().manual_seed(self.seed * 1000003 + self.batches)
        images = self.crop(index, generator)
        self.position = Position(self.position.epoch, 0, start + self.batch_size)
        self.batches += 1
        return {"images": images, "ids": index.tolist(), "skipped": []}

    def crop(self, index: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Random resized crops of the images at ``index`` -> (B, 3, H, W) float32 in [-1, 1] on the device."""
        count = index.shape[0]
        heights, widths = self.sizes[index, 0], self.sizes[index, 1]
        area = heights * widths * torch.empty(count).uniform_(*self.crop_scale, generator=generator)
        log_ratio = torch.empty(count).uniform_(math.log(self.ratio[0]), math.log(self.ratio[1]), generator=generator)
        crop_w = torch.sqrt(area * torch.exp(log_ratio)).clamp(max=widths).clamp(min=1.0)
        crop_h = torch.sqrt(area / torch.exp(log_ratio)).clamp(max=heights).clamp(min=1.0)
        left = (widths - crop_w) * torch.rand(count, generator=generator)
        top = (heights - crop_h) * torch.rand(count, generator=generator)
        canvas_h, canvas_w = self.canvas.shape[2:]
        theta = torch.zeros(count, 2, 3)
        theta[:, 0, 0] = crop_w / canvas_w
        theta[:, 0, 2] = (2 * left + crop_w) / canvas_w - 1
        theta[:, 1, 1] = crop_h / canvas_h
        theta[:, 1, 2] = (2 * top + crop_h) / canvas_h - 1
        grid = F.affine_grid(theta.to(self.device), [count, 3, *self.size], align_corners=False)
        pixels = self.canvas[index.to(self.device)].float()
        crops = F.grid_sample(pixels, grid, mode="bicubic", padding_mode="border", align_corners=False)
        return (crops.clamp(0, 255) / 127.5 - 1.0).clamp(-1.0, 1.0)

    def state_dict(self) -> dict[str, Any]:
        """The :class:`~dualtoken.data.TrainLoader` form; ``streams`` 0 marks the device loader."""
        return {
            "positions": {"0": self.position.to_dict()},
            "streams": 0,
            "world_size": 1,
            "batches": self.batches,
            "skipped": self.skipped,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a saved position (a file loader's state restarts its slowest stream's epoch)."""
        self.batches = int(state["batches"])
        positions = [Position.from_dict(p) for p in state["positions"].values()]
        saved = positions[0] if state["streams"] == 0 else Position(min((p.epoch for p in positions), default=0))
        self.position = saved
        self._order = self._epoch_order(saved.epoch)
