"""Image I/O: read any PIL-readable file safely, resize + centre-crop + normalise to [-1, 1], and back to uint8."""

from __future__ import annotations

import io
import os
import warnings
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import BinaryIO, TypeVar

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import ImageError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
MAX_PIXELS = 16384 * 16384  # decompression-bomb guard: larger images are refused
UPSCALE_WARNING = 2.0  # load_image warns when it enlarges an image by more than this factor
# zlib level of the PNGs written: 1 compresses a 256 x 256 photo about 3x faster than Pillow's default 6 for files
# about 4 % larger (docs/PERFORMANCE.md), and writing PNGs is a large part of `dualtoken decode`
PNG_COMPRESS_LEVEL = 1


class UpscaledImageWarning(UserWarning):
    """An image smaller than the model's input was enlarged by more than :data:`UPSCALE_WARNING` times: its
    reconstruction and codes describe interpolated pixels."""

Image.MAX_IMAGE_PIXELS = MAX_PIXELS
SAMPLE_PHOTOS = ("astronaut", "coffee", "chelsea")  # in scikit-image: `dualtoken demo`'s and the page's samples


def sample_photos() -> list[tuple[str, np.ndarray]]:
    """Real photos that ship inside scikit-image, :data:`SAMPLE_PHOTOS`: (name, uint8 HWC array)."""
    from skimage import data

    return [(name, getattr(data, name)()) for name in SAMPLE_PHOTOS]


def png_bytes(pixels: np.ndarray) -> bytes:
    """uint8 (H, W, 3) -> PNG file bytes."""
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
    return buffer.getvalue()


def empty_file_error(name: str, formats: str = "PNG, JPEG, WebP, ...") -> ImageError:
    """The one wording of an empty image file (0 bytes), on the command line and in the server's answers alike."""
    return ImageError(f"{name}: empty file (0 bytes); expected an image file ({formats})")


def _is_empty(source: str | Path | BinaryIO) -> bool:
    """Whether a file or a seekable stream holds no byte (asked of a source PIL could not identify)."""
    if isinstance(source, (str, Path)):
        return os.path.isfile(source) and os.path.getsize(source) == 0
    return source.seekable() and source.seek(0, os.SEEK_END) == 0


def open_rgb(source: str | Path | BinaryIO) -> Image.Image:
    """Decode an image fully as 8-bit RGB: EXIF rotation applied, alpha composited on white, 16-bit scaled down."""
    name = str(source) if isinstance(source, (str, Path)) else "upload"
    try:
        with Image.open(source) as image:
            image = ImageOps.exif_transpose(image)
            image.load()
            return _to_rgb(image)
    except FileNotFoundError:
        raise ImageError(f"image file not found: {name}") from None
    except Image.DecompressionBombError as exc:
        raise ImageError(f"{name}: image too large ({exc})") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        if _is_empty(source):
            raise empty_file_error(name) from None
        raise ImageError(f"{name}: not a readable image ({exc})") from None


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        array = np.asarray(image, dtype=np.float64)
        scale = 65535.0 if array.max() > 255 else 255.0
        image = Image.fromarray(np.clip(array / scale * 255.0 + 0.5, 0, 255).astype(np.uint8))
    if image.mode == "F":
        array = np.asarray(image, dtype=np.float64)
        image = Image.fromarray(np.clip(array * 255.0 + 0.5, 0, 255).astype(np.uint8))
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def resize_center_crop(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    """Resize the shortest side to fit ``size`` (H, W) with bicubic filtering, then crop the centre."""
    height, width = size
    scale = max(height / image.height, width / image.width)
    new_size = (max(width, round(image.width * scale)), max(height, round(image.height * scale)))
    if new_size != image.size:
        image = image.resize(new_size, Image.BICUBIC)
    left, top = (image.width - width) // 2, (image.height - height) // 2
    return image.crop((left, top, left + width, top + height))


def to_tensor(image: Image.Image) -> torch.Tensor:
    """An RGB PIL image -> float (3, H, W) in [-1, 1] (mean = std = 0.5 normalisation)."""
    array = np.asarray(image, dtype=np.float32)  # (H, W, 3) in 0..255
    return torch.from_numpy(array).permute(2, 0, 1).contiguous() / 127.5 - 1.0


def load_image(source: str | Path | BinaryIO, size: tuple[int, int] | None = None) -> torch.Tensor:
    """Read an image file -> float (3, H, W) in [-1, 1], resized and centre-cropped to ``size`` when given: the
    shortest side is scaled to the model's side and the centre kept, so a non-square photo loses its edges; an
    image enlarged by more than 2x gets an :class:`UpscaledImageWarning` naming it."""
    image = open_rgb(source)
    if size is not None:
        scale = max(size[0] / image.height, size[1] / image.width)
        if scale > UPSCALE_WARNING:
            name = str(source) if isinstance(source, (str, Path)) else "upload"
            warnings.warn(
                f"{name} ({image.width}x{image.height}) upscaled {scale:.1f}x to {size[1]}x{size[0]}: "
                "its codes describe interpolated pixels",
                UpscaledImageWarning,
                stacklevel=2,
            )
        image = resize_center_crop(image, size)
    return to_tensor(image)


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """Images in [-1, 1], (3, H, W) or (B, 3, H, W) -> uint8 (H, W, 3) or (B, H, W, 3); clamps and rounds."""
    if images.ndim not in (3, 4) or images.shape[-3] != 3:
        raise ImageError(f"expected (3, H, W) or (B, 3, H, W) images, got {tuple(images.shape)}")
    pixels = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return pixels.movedim(-3, -1).numpy()


def save_image(image: torch.Tensor | np.ndarray, path: str | Path) -> Path:
    """Write one image ((3, H, W) in [-1, 1], or uint8 (H, W, 3)) as a file, atomically."""
    array = image if isinstance(image, np.ndarray) else to_uint8(image)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp{os.getpid()}{path.suffix}")
    options = {"compress_level": PNG_COMPRESS_LEVEL} if path.suffix.lower() == ".png" else {}
    Image.fromarray(array).save(tmp, **options)
    os.replace(tmp, path)
    return path


Item = TypeVar("Item")
_DONE = object()


def read_ahead(items: Iterable[Item]) -> Iterator[Item]:
    """``items`` in order, the next one produced on a worker thread while the caller works on the current one (Pillow
    decodes and resizes without the GIL, so reading the next batch of images overlaps encoding this one). An
    exception of the producer is raised where its item would have come; stopping early waits for the item in flight."""
    source = iter(items)
    pool = ThreadPoolExecutor(1, thread_name_prefix="dualtoken-read")
    try:
        upcoming = pool.submit(next, source, _DONE)
        while (item := upcoming.result()) is not _DONE:
            upcoming = pool.submit(next, source, _DONE)
            yield item
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


class BackgroundSaver:
    """Saves images on a worker thread while the caller computes the next ones (PNG compression releases the GIL,
    so on a multi-core CPU the writing overlaps the decoding). At most ``pending`` images wait in memory; a failed
    write raises at the next :meth:`save` or when the ``with`` block ends, and every file is written atomically
    (:func:`save_image`), so nothing half-written is left behind."""

    def __init__(self, pending: int = 32) -> None:
        self.pending = pending
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="dualtoken-save")
        self._futures: list[Future] = []

    def save(self, image: np.ndarray, path: str | Path) -> None:
        """Queue uint8 (H, W, 3) ``image`` for ``path``; blocks while ``pending`` images wait."""
        while len(self._futures) >= self.pending:
            self._futures.pop(0).result()
        self._futures.append(self._pool.submit(save_image, image, path))

    def __enter__(self) -> BackgroundSaver:
        return self

    def __exit__(self, *exc_info: object) -> None:
        try:
            for future in self._futures:
                future.result()
        finally:
            self._pool.shutdown(wait=True, cancel_futures=True)


def replace_with_default_mode(tmp: str | Path, path: str | Path) -> Path:
    """Move a finished temporary file onto ``path`` (atomic) with the mode a new file gets under the user's umask
    (safetensors creates its files 0600, unlike every other file a command writes)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    os.replace(tmp, path)
    return Path(path)


def list_images(folder: str | Path) -> list[Path]:
    """Image files below ``folder`` (recursive), sorted; ImageError when there are none."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ImageError(f"not a folder: {folder}")
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ImageError(f"no image files ({', '.join(IMAGE_SUFFIXES)}) under {folder}")
    return files
