"""Trained models shipped inside the package, loadable by name without any download."""

from __future__ import annotations

from importlib import resources
from pathlib import Path


def _root() -> Path:
    return Path(str(resources.files("dualtoken"))) / "pretrained"


def list_pretrained() -> list[str]:
    """Names of the embedded trained models (folders holding config.json + model.safetensors)."""
    root = _root()
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if (p / "config.json").is_file() and (p / "model.safetensors").is_file())


def pretrained_path(name: str) -> Path | None:
    """The folder of an embedded model, or None when ``name`` is not one."""
    path = _root() / name
    return path if name in list_pretrained() else None
