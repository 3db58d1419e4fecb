"""The Hugging Face Hub, for models and for pretrained towers alike: repo ids, and files fetched once into the
user's Hugging Face cache (``HF_HUB_CACHE`` / ``HF_HOME``; ``HF_HUB_OFFLINE=1`` reads the cache only)."""

from __future__ import annotations

from pathlib import Path

from .errors import CheckpointError


def is_repo_id(spec: str) -> bool:
    """``org/name`` as the Hub validates it (no local-path look)."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if spec.count("/") != 1 or spec.startswith((".", "/")):
        return False
    try:
        validate_repo_id(spec)
    except HFValidationError:
        return False
    return True


# what a pretrained tower's Hub repo is fetched with: its configs, safetensors weights, tokenizer and processor files
TOWER_FILES = ("*.json", "*.safetensors", "*.model", "*.txt")
HUB_SCHEME = "hf://"  # huggingface_hub's URL form of a repo id; config files keep it as it is (not a path)


def resolve_pretrained_folder(
    spec: str | Path, model_dir: str | Path | None = None, revision: str | None = None, what: str = "SigLIP folder"
) -> Path:
    """The folder of a pretrained tower (a SigLIP vision tower, the teacher, zero-shot's text tower), resolved like
    models: a local folder (a relative path is taken from ``model_dir`` first, then the working directory), or a
    Hub repo id ``org/name`` (also ``hf://org/name``) fetched once into the Hugging Face cache at ``revision``
    (``HF_HUB_OFFLINE=1``: the cache only). CheckpointError when it is neither."""
    spec = str(spec)
    if spec.startswith(HUB_SCHEME):
        return download(spec[len(HUB_SCHEME):], revision, TOWER_FILES, what)
    path = Path(spec)
    if not path.is_absolute() and model_dir is not None and (Path(model_dir) / path).is_dir():
        return Path(model_dir) / path
    if path.is_dir():
        return path
    if is_repo_id(spec):
        return download(spec, revision, TOWER_FILES, what)
    raise CheckpointError(f"{spec} is not a {what} in save_pretrained format (no such folder) nor a Hub repo id")


def is_hub_spec(spec: str) -> bool:
    """A tower named by its Hub repo id (``org/name`` that is no local folder, or ``hf://org/name``)."""
    return spec.startswith(HUB_SCHEME) or (not Path(spec).is_dir() and is_repo_id(spec))


def download(repo_id: str, revision: str | None, patterns: tuple[str, ...], what: str = "model folder") -> Path:
    """The ``patterns`` files of a Hub repo in the user's Hugging Face cache (fetched when missing and online)."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=list(patterns)))
    except RepositoryNotFoundError:
        raise CheckpointError(f"no {what} {repo_id!r} here and no Hub repo {repo_id!r}") from None
    except LocalEntryNotFoundError:
        offline = " (HF_HUB_OFFLINE is set)" if constants.HF_HUB_OFFLINE else ""
        raise CheckpointError(
            f"no {what} {repo_id!r} here, and the Hub repo {repo_id!r} is not in the Hugging Face cache "
            f"{constants.HF_HUB_CACHE} and cannot be downloaded{offline}"
        ) from None
    except (HfHubHTTPError, OSError) as exc:
        raise CheckpointError(f"cannot download Hub repo {repo_id!r}: {exc}") from None
