"""Configs: one dataclass per component, a JSON round trip that rejects unknown keys, and the path convention of
config files.

Every number the model uses lives here. Backbone configs live with their family in :mod:`dualtoken.backbones` and
are chosen by their ``kind`` field; the named models are in :mod:`dualtoken.registry`.

Paths inside a config file are relative to that file's folder (:func:`resolve_path`), whatever the working
directory; paths given on a command line (``--set key=value``) are relative to the working directory.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from .backbones import BackboneConfig, SiglipBackboneConfig
from .errors import ConfigError

T = TypeVar("T")


# ----------------------------------------------------------------------------------------------------------------
# Generic JSON round trip
# ----------------------------------------------------------------------------------------------------------------


def to_dict(config: Any) -> dict[str, Any]:
    """A plain JSON-ready dict of a config dataclass (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(config)))


def _coerce(value: Any, hint: Any, where: str) -> Any:
    """Check ``value`` against a type hint and convert JSON forms (lists -> tuples, dicts -> dataclasses)."""
    origin = typing.get_origin(hint)
    if hint is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, where)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{where}: {value!r} matches none of {hint}")
    if origin is typing.Literal:
        if value not in typing.get_args(hint):
            raise ConfigError(f"{where}: {value!r} is not one of {list(typing.get_args(hint))}")
        return value
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        args = typing.get_args(hint)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ConfigError(f"{where}: expected {len(args)} items, got {len(value)}")
            items = [_coerce(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args))]
        else:
            item_hint = args[0] if args else Any
            items = [_coerce(v, item_hint, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected an object, got {value!r}")
        return dict(value)
    if dataclasses.is_dataclass(hint):
        if isinstance(value, hint):
            return value
        return from_dict(hint, value, where)
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{where}: unsupported config type {hint}")


def from_dict(cls: type[T], data: Any, where: str | None = None) -> T:
    """Build config ``cls`` from a dict, raising :class:`ConfigError` on unknown keys or wrong types."""
    where = where or cls.__name__
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected an object, got {data!r}")
    if hasattr(cls, "resolve_class"):
        cls = cls.resolve_class(data, where)  # type: ignore[attr-defined]
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; expected some of {sorted(names)}")
    kwargs = {name: _coerce(value, hints[name], f"{where}.{name}") for name, value in data.items()}
    try:
        return cls(**kwargs)
    except TypeError as exc:
        raise ConfigError(f"{where}: {exc}") from None


def read_json(path: str | Path, what: str = "config file") -> Any:
    """Parse a JSON file; a missing file or invalid JSON raises ConfigError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{what} not found: {path}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{what} {path} is not valid JSON: {exc}") from None


def load_config_file(cls: type[T], path: str | Path, what: str = "config file") -> T:
    """A config dataclass from a JSON file (unknown keys and wrong types raise ConfigError).

    The class names its path fields in ``path_fields`` (dotted keys: always paths) and ``name_or_path_fields``
    (a model name or a path); relative paths among them are taken from the file's folder. A class with an
    ``upgrade(data)`` classmethod renames keys of older versions first.
    """
    data = read_json(path, what)
    if isinstance(data, dict):
        if hasattr(cls, "upgrade"):
            data = cls.upgrade(data)
        base = Path(path).resolve().parent
        for key in getattr(cls, "path_fields", ()):
            _map_field(data, key, lambda value: resolve_path(value, base))
        for key in getattr(cls, "name_or_path_fields", ()):
            _map_field(data, key, lambda value: resolve_name_or_path(value, base))
    return from_dict(cls, data, where=Path(path).name)


def _map_field(data: dict[str, Any], key: str, fn) -> None:
    """Apply ``fn`` to the string (or each string of the list) at dotted ``key`` of ``data``, when present."""
    *parents, last = key.split(".")
    for part in parents:
        data = data.get(part)
        if not isinstance(data, dict):
            return
    value = data.get(last)
    if isinstance(value, str):
        data[last] = fn(value)
    elif isinstance(value, list):
        data[last] = [fn(v) if isinstance(v, str) else v for v in value]


def resolve_path(value: str, base: str | Path) -> str:
    """A path read from a config file in folder ``base``: relative paths are taken from that folder. URLs and
    pipes (``scheme://...``, ``pipe:...``) are returned as they are."""
    if "://" in value or value.startswith("pipe:") or Path(value).is_absolute():
        return value
    return str((Path(base) / value).resolve())


def resolve_name_or_path(value: str, base: str | Path) -> str:
    """A field that takes a model name (registry name, Hub repo id) or a path: a path when one exists in ``base``
    or when it starts with ``./`` or ``../``; otherwise a name, returned as it is."""
    if value.startswith(("./", "../")) or (Path(base) / value).exists():
        return resolve_path(value, base)
    return value


def apply_overrides(config: T, overrides: list[str]) -> T:
    """Return a copy of ``config`` with ``key.sub=value`` overrides applied (values parsed as JSON, else string).

    The result goes through :func:`from_dict`, so an unknown key or a wrongly typed value raises ConfigError.
    """
    data = to_dict(config)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected the form key.sub=value")
        key, raw = item.split("=", 1)
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        node = data
        parts = key.split(".")
        for part in parts[:-1]:
            if not isinstance(node.get(part), dict):
                raise ConfigError(f"override {item!r}: {part!r} is not a config section")
            node = node[part]
        if parts[-1] not in node:
            raise ConfigError(f"override {item!r}: unknown key {key!r}")
        node[parts[-1]] = value
    return from_dict(type(config), data)


# ----------------------------------------------------------------------------------------------------------------
# Components
# ----------------------------------------------------------------------------------------------------------------

CodebookSharing = typing.Literal["shared", "per_depth"]
RestartLiveness = typing.Literal["pooled", "per_depth"]


@dataclass
class QuantizerConfig:
    """A residual quantizer updated by EMA with dead-code restart; by default (the release's) one codebook shared by
    all depths, whose codes are restarted when their cluster size summed over the depths falls below 1."""

    codebook_size: int = 16384
    code_dim: int = 32
    depth: int = 8
    decay: float = 0.99
    eps: float = 1e-5
    restart_unused_codes: bool = True
    restart_noise: float = 0.01
    # a code whose EMA cluster size (uses per update) falls below this is restarted
    restart_threshold: float = 1.0
    # "shared": one (K, D) codebook for every depth (the release's); "per_depth": one codebook per depth, (Q, K, D),
    # each learning and restarting from its own depth's residuals (same bits per position)
    codebook_sharing: CodebookSharing = "shared"
    # liveness of a shared codebook. "pooled": one count per code summed over the depths, a dead code restarted from
    # the residuals of the depth whose update found it dead (the release's); "per_depth": counts per depth and code,
    # a code no depth uses restarted from the residuals of the depth that uses the fewest codes
    restart_liveness: RestartLiveness = "pooled"
    # "per_depth": an EMA update inside each depth (the release's `rq`, pixel branch);
    # "per_step": one update per forward after all depths (the release's `rq_ema`, semantic branch)
    ema_schedule: typing.Literal["per_depth", "per_step"] = "per_depth"
    # the release's `rq_ema` aliasing quirk: the per-step update uses the final residual Q times
    per_step_final_residual: bool = False
    # rows per block of the nearest-code search: bounds the distance matrix held in memory
    search_block_rows: int = 256
    # inference search (no codebook update) of a shared codebook, first pass of every depth before the exact
    # settling: "gram" scores each row once and updates the scores from the cached Gram matrix E E^T (memory-bound;
    # for codes at least search_gram_min_dim wide whose K x K float32 table fits in search_gram_max_mib, 0: never),
    # "matmul" scores every depth by one float32 matmul (no table: 1 GiB less for the shipped semantic
    # vocabulary, at about half the speed on a CPU), "auto" picks gram on a CPU and matmul on CUDA
    # (docs/PERFORMANCE.md). The codes are the same whichever runs
    search_first_pass: typing.Literal["auto", "gram", "matmul"] = "auto"
    search_gram_min_dim: int = 64
    search_gram_max_mib: int = 1024

    def __post_init__(self) -> None:
        for name in ("codebook_size", "code_dim", "depth", "search_block_rows"):
            if getattr(self, name) < 1:
                raise ConfigError(f"QuantizerConfig.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("search_gram_min_dim", "search_gram_max_mib"):
            if getattr(self, name) < 0:
                raise ConfigError(f"QuantizerConfig.{name} must be >= 0, got {getattr(self, name)}")
        if not 0.0 <= self.decay < 1.0:
            raise ConfigError(f"QuantizerConfig.decay must be in [0, 1), got {self.decay}")
        if not self.restart_threshold > 0.0:
            raise ConfigError(f"QuantizerConfig.restart_threshold must be > 0, got {self.restart_threshold}")
        for name, allowed in (("search_first_pass", ("auto", "gram", "matmul")),
                              ("codebook_sharing", typing.get_args(CodebookSharing)),
                              ("restart_liveness", typing.get_args(RestartLiveness))):
            if getattr(self, name) not in allowed:
                raise ConfigError(f"QuantizerConfig.{name}: {getattr(self, name)!r} is not one of {list(allowed)}")
        if self.codebook_sharing == "per_depth" and self.restart_liveness != "pooled":
            raise ConfigError(
                "QuantizerConfig.restart_liveness: per-depth codebooks count each depth on its own; "
                f"with codebook_sharing 'per_depth' it must be 'pooled', got {self.restart_liveness!r}"
            )


@dataclass
class ProjectionConfig:
    """AttnProjection (down W->D non-causal head-averaged; up D->W causal); heads have width = code_dim."""

    mlp_ratio: int = 2
    norm_eps: float = 1e-5
    mlp_norm_eps: float = 1e-6


@dataclass
class DecoderConfig:
    """Post-quant ResNet block and the taming-style conv decoder."""

    channels: int = 128
    channel_mult: tuple[int, ...] = (1, 1, 4, 4, 8)
    num_res_blocks: int = 2
    attn_resolutions: tuple[int, ...] = (24,)
    resolution: int = 384
    in_channels: int = 1024
    latent_size: tuple[int, int] | None = None
    out_channels: int = 3
    norm_groups: int = 32
    norm_eps: float = 1e-6
    dropout: float = 0.0

    @property
    def upsample_factor(self) -> int:
        return 2 ** (len(self.channel_mult) - 1)


@dataclass
class TokenizerConfig:
    """The whole DualToken tokenizer: backbone taps, two vocabularies, the pixel decoder."""

    name: str = "custom"
    # the trained model these weights were fine-tuned from (set by save_pretrained when it renames an export)
    base_model: str | None = None
    backbone: BackboneConfig = field(default_factory=SiglipBackboneConfig)
    pixel_layer: int = 6
    shortcut_layer: int | None = 4
    shortcut_weight: float = 0.6
    semantic_layer: int = 26
    # None: a single vocabulary (VILA-U style): the decoder reads the semantic codes, as in the paper's ablation
    pixel_quantizer: QuantizerConfig | None = field(default_factory=QuantizerConfig)
    semantic_quantizer: QuantizerConfig = field(
        default_factory=lambda: QuantizerConfig(ema_schedule="per_step")
    )
    projection: ProjectionConfig = field(default_factory=ProjectionConfig)
    decoder: DecoderConfig = field(default_factory=DecoderConfig)

    def __post_init__(self) -> None:
        if self.pixel_layer > self.semantic_layer:
            raise ConfigError(
                f"pixel_layer ({self.pixel_layer}) must not come after semantic_layer ({self.semantic_layer})"
            )
        if self.shortcut_layer is not None and not 1 <= self.shortcut_layer <= self.semantic_layer:
            raise ConfigError(f"shortcut_layer ({self.shortcut_layer}) must be in 1..semantic_layer")
        if self.pixel_layer < 1:
            raise ConfigError(f"pixel_layer must be >= 1, got {self.pixel_layer}")
        if self.pixel_quantizer is None and self.shortcut_layer is not None:
            raise ConfigError("a single vocabulary (pixel_quantizer null) takes no shortcut tap")
        num_layers = getattr(self.backbone, "num_layers", None)
        if num_layers is not None and self.semantic_layer > num_layers:
            raise ConfigError(f"semantic_layer ({self.semantic_layer}) exceeds the backbone's {num_layers} layers")

    def at_resolution(self, image_size: int) -> TokenizerConfig:
        """The same architecture, and so the same weights, for ``image_size`` inputs: the token grid and the
        decoder's output scale with the image and attention stays at the same decoder level. For convolutional
        backbones only (train on small crops, tokenize CIFAR at 128 px with fewer positions)."""
        backbone = self.backbone.resized(image_size)
        old, decoder = self.backbone.image_size, self.decoder
        if decoder.latent_size is not None:
            raise ConfigError("a decoder with a fixed latent_size cannot change resolution")
        scaled = [decoder.resolution, *decoder.attn_resolutions]
        if any(r * image_size % old for r in scaled):
            raise ConfigError(
                f"image size {image_size} does not scale the decoder's resolutions {scaled} (from {old}) to integers"
            )
        decoder = dataclasses.replace(
            decoder,
            resolution=decoder.resolution * image_size // old,
            attn_resolutions=tuple(r * image_size // old for r in decoder.attn_resolutions),
        )
        return dataclasses.replace(self, backbone=backbone, decoder=decoder)

    def to_json(self) -> str:
        return json.dumps(to_dict(self), indent=2)

    @classmethod
    def from_json(cls, text: str) -> TokenizerConfig:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"config is not valid JSON: {exc}") from None
        return from_dict(cls, data)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_json() + "\n")

    @classmethod
    def load(cls, path: str | Path) -> TokenizerConfig:
        return load_config_file(cls, path)
