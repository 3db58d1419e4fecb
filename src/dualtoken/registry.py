"""The model registry and the one resolver every entry point uses (timm's pattern).

A registered name maps to its config, and so to its backbone family (``config.backbone.kind`` in
:data:`dualtoken.backbones.BACKBONES`), and to its weights:

- an **architecture** (``dualtoken/configs/<name>.json``): a config only; build it with random weights
  (``DualTokenizer.from_config``) and train it;
- a **trained model** (``dualtoken/pretrained/<name>/``): config and weights shipped inside the package, loaded with
  ``DualTokenizer.from_pretrained`` without any download.

To add an architecture, drop its JSON into ``configs/``; to ship trained weights, a ``save_pretrained`` folder into
``pretrained/``. :func:`resolve_model_dir` turns anything a user may type into a model folder: a trained name, a
local ``save_pretrained`` folder, or a Hugging Face Hub repo id (``org/name``), downloaded once into the user's
Hugging Face cache (``HF_HUB_CACHE`` / ``HF_HOME``; ``HF_HUB_OFFLINE=1`` reads the cache only).
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from .config import TokenizerConfig
from .errors import CheckpointError, ConfigError, DamagedInstallError
from .hub import download, is_repo_id

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
CARD_NAME = "README.md"
# what a model folder holds; a Hub download fetches these and nothing else
MODEL_FILES = (CONFIG_NAME, WEIGHTS_NAME, CARD_NAME)
# the trained model the command line and the server use when no model is named
DEFAULT_MODEL = "dualtoken-efflite0"
# a unified MLLM folder (DualTokenMLLM.save_pretrained); an embedded one also lists its files' SHA-256 in MANIFEST_NAME
MLLM_CONFIG_NAME = "mllm_config.json"
MLLM_WEIGHTS_NAME = "mllm.safetensors"
MANIFEST_NAME = "files.sha256"
# the MLLM that `chat`, `generate` and `serve` use when none is named
DEFAULT_MLLM = "dualtoken-mllm-cifar10"
REINSTALL_HINT = "reinstall the package: pip install --force-reinstall dualtoken (from a checkout: make install)"


@dataclass(frozen=True)
class ModelEntry:
    """One registered name: where its config lives and, for a trained model, its weights."""

    name: str
    config_file: Path
    weights_dir: Path | None  # the embedded save_pretrained folder; None for an architecture

    @property
    def trained(self) -> bool:
        return self.weights_dir is not None

    @property
    def kind(self) -> str:
        return "trained model" if self.trained else "architecture without trained weights"

    def config(self) -> TokenizerConfig:
        return TokenizerConfig.load(self.config_file)


def _package_dir(sub: str) -> Path:
    return Path(str(resources.files("dualtoken"))) / sub


def _entries() -> dict[str, ModelEntry]:
    entries = {}
    configs = _package_dir("configs")
    for path in sorted(configs.glob("*.json")):
        entries[path.stem] = ModelEntry(path.stem, path, None)
    pretrained = _package_dir("pretrained")
    for folder in sorted(pretrained.iterdir()) if pretrained.is_dir() else []:
        if (folder / CONFIG_NAME).is_file() and (folder / WEIGHTS_NAME).is_file():
            entries[folder.name] = ModelEntry(folder.name, folder / CONFIG_NAME, folder)
    return entries


def list_models(trained: bool = False) -> list[str]:
    """Every registered name, or only those with trained weights (``trained=True``)."""
    return sorted(name for name, entry in _entries().items() if entry.trained or not trained)


def is_model(name: str) -> bool:
    return name in _entries()


def model_entry(name: str) -> ModelEntry:
    """The registry entry of ``name``; ConfigError listing both kinds of names otherwise."""
    entries = _entries()
    if name not in entries:
        raise ConfigError(f"unknown model name {name!r}; {_known(entries)}")
    return entries[name]


def get_config(name: str) -> TokenizerConfig:
    """The config of a registered name (an architecture or a trained model), e.g. ``dualtoken-tiny``."""
    return model_entry(name).config()


def _known(entries: dict[str, ModelEntry]) -> str:
    trained = sorted(n for n, e in entries.items() if e.trained)
    architectures = sorted(n for n, e in entries.items() if not e.trained)
    return f"trained models: {trained}; architectures (random weights, from_config): {architectures}"


def resolve_model_dir(name_or_path: str | Path, revision: str | None = None) -> Path:
    """The folder holding ``config.json`` + ``model.safetensors`` for a trained name, a local folder or a Hub id.

    An architecture name raises CheckpointError saying it has no trained weights; so does anything that is none of
    the three (the message names what was tried).
    """
    spec = str(name_or_path)
    entries = _entries()
    if spec in entries:
        entry = entries[spec]
        if entry.weights_dir is None:
            raise CheckpointError(
                f"{spec!r} is an architecture without trained weights: build it with random weights with "
                f"DualTokenizer.from_config({spec!r}) (on the command line: --random-weights), or train it; "
                f"{_known(entries)}"
            )
        return entry.weights_dir
    path = Path(spec)
    if path.is_dir():
        return _checked_folder(path, spec)
    if is_repo_id(spec):
        return _checked_folder(download(spec, revision, MODEL_FILES), spec)
    raise CheckpointError(
        f"no model {spec!r}: not a registered name, not a model folder, not a Hub repo id (org/name); "
        f"{_known(entries)}"
    )


def _checked_folder(path: Path, spec: str) -> Path:
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        if not (path / name).is_file():
            raise CheckpointError(f"{spec}: {path} has no {name} (expected a folder written by save_pretrained)")
    return path


def list_mllms() -> list[str]:
    """The unified MLLMs embedded in the package: the folders of ``pretrained/`` that are not a tokenizer's (no
    ``config.json``), so that one with files missing is still found and reported."""
    pretrained = _package_dir("pretrained")
    folders = sorted(pretrained.iterdir()) if pretrained.is_dir() else []
    return [f.name for f in folders if f.is_dir() and not (f / CONFIG_NAME).is_file()]


def resolve_mllm_dir(name_or_path: str | Path) -> Path:
    """The folder of an MLLM: an embedded MLLM's name (its files checked against its manifest first) or a folder
    written by ``DualTokenMLLM.save_pretrained``. CheckpointError otherwise, naming the embedded MLLMs."""
    spec = str(name_or_path)
    if spec in list_mllms():
        folder = _package_dir("pretrained") / spec
        check_manifest(folder)
        return folder
    path = Path(spec)
    if path.is_dir():
        return path
    raise CheckpointError(f"no MLLM {spec!r}: not an embedded MLLM {list_mllms()} and not a folder")


def check_manifest(folder: Path) -> None:
    """Every file ``folder/MANIFEST_NAME`` lists exists with its SHA-256; DamagedInstallError names the first
    missing or corrupted one (an embedded model ships inside the package, so reinstalling restores it)."""
    import hashlib

    manifest = folder / MANIFEST_NAME
    if not manifest.is_file():
        raise DamagedInstallError(f"{manifest} is missing; {REINSTALL_HINT}")
    for line in manifest.read_text().splitlines():
        digest, _, name = line.partition("  ")
        path = folder / name
        if not path.is_file():
            raise DamagedInstallError(f"{path} is missing; {REINSTALL_HINT}")
        if hashlib.sha256(path.read_bytes()).hexdigest() != digest:
            raise DamagedInstallError(
                f"{path} is corrupted (its SHA-256 differs from {MANIFEST_NAME}); {REINSTALL_HINT}"
            )


def write_manifest(folder: Path) -> Path:
    """List every file under ``folder`` but the model card with its SHA-256 (``sha256sum`` format) in
    ``folder/MANIFEST_NAME``."""
    import hashlib

    skip = (MANIFEST_NAME, CARD_NAME)
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.relative_to(folder).as_posix() not in skip)
    lines = [f"{hashlib.sha256(p.read_bytes()).hexdigest()}  {p.relative_to(folder).as_posix()}" for p in files]
    (folder / MANIFEST_NAME).write_text("\n".join(lines) + "\n")
    return folder / MANIFEST_NAME
