"""Starting a run: the engine with the task a :class:`TrainConfig` names (``branch``)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from torch import nn

from ..tokenizer import DualTokenizer
from .config import TrainConfig
from .engine import Engine
from .semantic import SemanticTask
from .tasks import TokenizerTask


def tokenizer_engine(
    config: TrainConfig,
    tokenizer: DualTokenizer | None = None,
    teacher: nn.Module | None = None,
    loader: Iterator[dict[str, Any]] | None = None,
) -> Engine:
    """The engine for ``config``'s task: the whole tokenizer or its pixel branch on images (a given ``tokenizer``,
    ``teacher`` or ``loader`` replaces what the config names; see :class:`TokenizerTask`), or the semantic branch
    on cached tap features (``branch: "semantic"``)."""
    if config.branch == "semantic":
        if tokenizer is not None or teacher is not None or loader is not None:
            raise ValueError('branch "semantic" builds its model, teacher and data from the config')
        return Engine(config, SemanticTask)
    return Engine(config, lambda engine: TokenizerTask(engine, tokenizer, teacher, loader))


def train(config: TrainConfig, stop_at: int | None = None) -> dict[str, Any]:
    """Run (or resume) the training ``config`` describes, then release the process group the run made; see
    :meth:`Engine.fit` for ``stop_at`` and the summary returned."""
    return tokenizer_engine(config).run(stop_at)
