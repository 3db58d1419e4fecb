"""Training: one engine (one process or torchrun DDP / FSDP2) for every task, its config, optimisers, freeze
presets, resumable checkpoints and metric sinks. ``dualtoken train --config FILE`` runs :func:`train`, the engine
with the task ``branch`` names; ``dualtoken finetune`` runs :func:`dualtoken.training.finetune.finetune`."""

from collections.abc import Iterator
from typing import Any

from torch import nn

from ..errors import ConfigError
from ..tokenizer import DualTokenizer
from .config import (
    CheckpointConfig,
    DataConfig,
    FreezeConfig,
    LogConfig,
    OptimizerConfig,
    TrainConfig,
    load_train_config,
)
from .engine import Callback, Engine, Task
from .pixel import PixelTapTask
from .semantic import SemanticTask
from .tasks import TokenizerTask


def tokenizer_engine(
    config: TrainConfig,
    tokenizer: DualTokenizer | None = None,
    teacher: nn.Module | None = None,
    loader: Iterator[dict[str, Any]] | None = None,
) -> Engine:
    """The engine for ``config``'s task: the whole tokenizer or its pixel branch on images (a given ``tokenizer``,
    ``teacher`` or ``loader`` replaces what the config names; see :class:`TokenizerTask`), the pixel branch on
    cached pixel-tap tokens (``branch: "pixel"`` with ``cache.pixel_tap``; a given ``tokenizer`` is trained), or the
    semantic branch on cached tap features (``branch: "semantic"``)."""
    if config.branch == "semantic":
        if tokenizer is not None or teacher is not None or loader is not None:
            raise ConfigError('branch "semantic" builds its model, teacher and data from the config')
        return Engine(config, SemanticTask)
    if config.cache.pixel_tap:
        if teacher is not None or loader is not None:
            raise ConfigError("cache.pixel_tap builds its data from data.train and has no teacher")
        return Engine(config, lambda engine: PixelTapTask(engine, tokenizer))
    return Engine(config, lambda engine: TokenizerTask(engine, tokenizer, teacher, loader))


def train(config: TrainConfig, stop_at: int | None = None) -> dict[str, Any]:
    """Run (or resume) the training ``config`` describes, then release the process group the run made; see
    :meth:`Engine.fit` for ``stop_at`` and the summary returned."""
    return tokenizer_engine(config).run(stop_at)


__all__ = [
    "Engine",
    "Task",
    "Callback",
    "TokenizerTask",
    "SemanticTask",
    "PixelTapTask",
    "tokenizer_engine",
    "train",
    "TrainConfig",
    "DataConfig",
    "OptimizerConfig",
    "FreezeConfig",
    "CheckpointConfig",
    "LogConfig",
    "load_train_config",
]
