"""What the commands share: the model options and how a model is loaded, and the bad-file policy.

Bad files: every command that reads images skips an unreadable one with one line on stderr naming it and why
(a :class:`~dualtoken.data.SkippedImageWarning`, printed by ``dualtoken.cli.main``), reports the count at the end,
and fails (exit 2) only when nothing was readable, with one summary line; ``--strict`` turns the first skip into
that error. A single image (one input that is one file, or a path that does not exist) has nothing to skip to: its
failure is the error line itself.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from ..backend import BACKENDS, check_backend, explain_backend, set_inference_backend
from ..data.images import warn_skipped
from ..errors import DataError, ImageError
from ..io import list_images, load_image, read_ahead
from ..precision import INFERENCE_PRECISIONS, check_precision, explain, set_inference_precision
from ..registry import DEFAULT_MODEL, get_config
from ..tokenizer import DualTokenizer

# the epilog of every command that reads images
IMAGE_NOTE = (
    "Each image is resized so that its shortest side fits the model's input (256x256 for dualtoken-efflite0) and "
    "centre-cropped: a non-square photo loses its edges. An image enlarged more than 2x is named in a warning."
)
MODEL_HELP = "a trained model's name, a save_pretrained folder, or a Hugging Face Hub repo id (org/name)"


def whole_number(minimum: int, maximum: int | None = None) -> Callable[[str], int]:
    """An argparse ``type`` for a whole number in ``minimum..maximum``: anything else is argparse's one error line
    (exit 2) naming the option, what it takes and what was given. Every integer option of every command has one."""
    expected = f"a whole number >= {minimum}" if maximum is None else f"a whole number in {minimum}..{maximum}"

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < minimum or (maximum is not None and value > maximum):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
        return value

    return parse


COUNT = whole_number(1)  # batch sizes, images, steps, threads, limits
ZERO_OR_MORE = whole_number(0)  # worker processes (0: none), top-k (0: off), seeds
PORT = whole_number(1, 65535)


def add_model_options(parser: argparse.ArgumentParser, default: str | None = DEFAULT_MODEL, note: str = "") -> None:
    """``--model`` and ``--random-weights``."""
    parser.add_argument("--model", default=default, help=MODEL_HELP + note)
    parser.add_argument(
        "--random-weights",
        action="store_true",
        help="build --model as an architecture (any name of `dualtoken info --list`) with random weights, "
        "seeded: for trying the pipeline, never for real images",
    )


def add_strict_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--strict", action="store_true", help="stop at the first unreadable input instead of skipping it"
    )


def add_precision_option(parser: argparse.ArgumentParser) -> None:
    """``--precision`` and ``--backend``: how the tokenizer's encode/decode run (checked by :func:`use_precision`,
    one error line)."""
    parser.add_argument(
        "--precision",
        default="auto",
        metavar="{" + ",".join(INFERENCE_PRECISIONS) + "}",
        help="encode/decode precision: auto = bf16 autocast where the hardware multiplies bf16 natively (CUDA, "
        "AMX or AVX-512 BF16 CPUs) and the backend is torch, float32 elsewhere; codes come from an exact search "
        "either way",
    )
    parser.add_argument(
        "--backend",
        default="auto",
        metavar="{" + ",".join(BACKENDS) + "}",
        help="encode/decode engine: auto = ONNX Runtime on a CPU where it is installed (float32), PyTorch "
        "elsewhere; torch = PyTorch eager",
    )


_pending_note: list[str] = []  # the precision note of use_precision(announce=False), until announce_precision


def use_precision(args: argparse.Namespace, announce: bool = True) -> None:
    """Check ``--precision`` and ``--backend`` on the command's device (``--device``, else CUDA when available, else the CPU), make it
    the default of every tokenizer the command loads, and print the choice once on stderr (a ``note:`` line).

    ``announce=False`` holds the note back until :func:`announce_precision`, called where the first image is
    computed: a command that fails on its inputs then prints its error line alone."""
    precision = check_precision(args.precision, INFERENCE_PRECISIONS)
    backend = check_backend(args.backend)
    device = getattr(args, "device", None)
    if device in (None, "auto"):
        device = "cuda" if torch.cuda.is_available() else "cpu"
    chosen = explain_backend(backend, device, precision)  # raises on an impossible pair before anything is set
    precision_note = explain(precision, device)
    if chosen.startswith("onnxruntime"):
        precision_note = f"float32 ({precision}: the onnxruntime backend runs float32)"
    set_inference_precision(precision)
    set_inference_backend(backend)
    _pending_note[:] = [f"note: precision: {precision_note}; backend: {chosen}"]
    if announce:
        announce_precision()


def announce_precision() -> None:
    """Print the held-back precision note, once."""
    while _pending_note:
        print(_pending_note.pop(), file=sys.stderr)


def load_model(spec: str, random_weights: bool = False) -> DualTokenizer:
    """Trained weights through the registry's resolver; random (seeded) weights only when asked for."""
    if not random_weights:
        return DualTokenizer.from_pretrained(spec)
    torch.manual_seed(0)
    return DualTokenizer.from_config(get_config(spec)).eval()


def expand_inputs(inputs: list[str]) -> list[Path]:
    """Files and folders from the command line -> image files; a missing path or an empty folder is skipped."""
    files: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            try:
                files.extend(list_images(path))
            except ImageError as exc:  # no image files in it
                _skip_or_raise(item, str(exc), len(inputs))
        elif path.is_file():
            files.append(path)
        else:
            _skip_or_raise(item, "no such file or folder", len(inputs))
    return files


def _skip_or_raise(item: str, reason: str, count: int) -> None:
    """Skip a bad input among several; the only input is an error naming it."""
    if count == 1:
        raise DataError(f"{item}: {reason.removeprefix(f'{item}: ')}")
    warn_skipped(item, reason)


def image_batches(
    files: list[Path], size: tuple[int, int], batch_size: int, skip: bool = True
) -> Iterator[tuple[list[Path], torch.Tensor]]:
    """(paths, images (B, 3, H, W)) of the readable files, ``batch_size`` at a time, the next batch read while the
    caller works on this one; unreadable ones are skipped (``skip=False``, for a single input: the ImageError of the
    only image is the command's error)."""
    return read_ahead(_read_batches(files, size, batch_size, skip))


def _read_batches(
    files: list[Path], size: tuple[int, int], batch_size: int, skip: bool
) -> Iterator[tuple[list[Path], torch.Tensor]]:
    paths, images = [], []
    for path in files:
        try:
            images.append(load_image(path, size))
            paths.append(path)
        except ImageError as exc:
            if not skip and len(files) == 1:
                raise
            warn_skipped(str(path), str(exc))
        if len(images) == batch_size:
            announce_precision()
            yield paths, torch.stack(images)
            paths, images = [], []
    if images:
        announce_precision()
        yield paths, torch.stack(images)


def plural(count: int, noun: str) -> str:
    """"1 image", "2 images"."""
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


def require_some(count: int, inputs: list[str]) -> None:
    """The policy's one failure: nothing of the inputs was readable."""
    if count == 0:
        noun = "input" if len(inputs) == 1 else f"{len(inputs)} inputs"
        raise DataError(f"no readable image among the {noun} {' '.join(inputs)}")
