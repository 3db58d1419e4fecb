"""Resume checkpoints: one file per saved step, written atomically, the newest N kept.

``<dir>/step-00001000.pt`` holds everything a run needs to continue exactly: model (codebooks included),
discriminator, both optimisers and schedulers, the grad scaler, the step, and every rank's RNG states and data
position. A file is written under a temporary name and renamed, so an interrupted write never replaces the last
good checkpoint; loading takes the newest file that reads back, skipping damaged ones with a warning.
"""

from __future__ import annotations

import os
import random
import re
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import CheckpointError

CHECKPOINT_PATTERN = re.compile(r"^step-(\d{8})\.pt$")


def checkpoint_path(folder: str | Path, step: int) -> Path:
    return Path(folder) / f"step-{step:08d}.pt"


def list_checkpoints(folder: str | Path) -> list[Path]:
    """Finished checkpoint files of a folder, oldest first (temporary files are never listed)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if CHECKPOINT_PATTERN.match(p.name)]
    return sorted(found, key=lambda p: int(CHECKPOINT_PATTERN.match(p.name).group(1)))


def save_checkpoint(folder: str | Path, step: int, state: dict[str, Any], keep_last: int) -> Path:
    """Write ``state`` for ``step`` atomically (temp file + fsync + rename), then delete all but the newest
    ``keep_last`` checkpoints."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = write_atomic(state, checkpoint_path(folder, step))
    for old in list_checkpoints(folder)[:-keep_last]:
        old.unlink(missing_ok=True)
    return path


def write_atomic(obj: Any, path: Path) -> Path:
    """``torch.save`` to a temporary file beside ``path``, fsync, rename: a reader sees the old file or the new one."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as handle:
            torch.save(obj, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def folder_beside(path: Path, kind: str) -> Path:
    """A new hidden folder beside ``path`` (same file system, so it can be renamed onto ``path``), named after it,
    with the mode a new folder gets under the user's umask (not mkdtemp's 0700)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix=f".{path.name}.{kind}-", dir=path.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(folder, 0o777 & ~umask)
    return folder


def replace_folder(finished: Path, path: Path) -> Path:
    """Put the folder ``finished`` (written beside ``path`` by :func:`folder_beside`) at ``path``, replacing what
    was there: the old folder is renamed aside, the new one renamed in, then the old one deleted. Each rename is
    atomic, so ``path`` holds the old folder or the new one, except between the two renames; a failure or an
    interrupt there puts the old one back."""
    aside = path.with_name(f".{path.name}.old-{os.getpid()}")
    try:
        if path.exists():
            os.rename(path, aside)
        os.rename(finished, path)
    except BaseException:
        if aside.exists() and not path.exists():
            os.rename(aside, path)
        raise
    shutil.rmtree(aside, ignore_errors=True)
    return path


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch.load raises many types on a damaged file; all mean the same here
        raise CheckpointError(f"cannot read checkpoint {path}: {type(exc).__name__}: {exc}") from None
    if not isinstance(state, dict) or "step" not in state:
        raise CheckpointError(f"{path} is not a dualtoken training checkpoint")
    return state


def load_latest_checkpoint(folder: str | Path) -> tuple[Path, dict[str, Any]] | None:
    """The newest checkpoint that reads back (damaged newer files are skipped with a warning), or None."""
    for path in reversed(list_checkpoints(folder)):
        try:
            return path, read_checkpoint(path)
        except CheckpointError as exc:
            warnings.warn(f"skipping damaged checkpoint: {exc}", RuntimeWarning, stacklevel=2)
    return None


def rng_state() -> dict[str, Any]:
    """This process's random generators: Python, NumPy, torch CPU and (when present) CUDA, in types
    ``torch.load(weights_only=True)`` reads."""
    kind, keys, position, has_gauss, gauss = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), position, has_gauss, gauss),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    kind, keys, position, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), position, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
