"""Training: one engine (one process or torchrun DDP / FSDP2) for every task, its config, optimisers, freeze
presets, resumable checkpoints and metric sinks. ``dualtoken train --config FILE`` runs :func:`train`."""

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
from .launch import tokenizer_engine, train
from .semantic import SemanticTask
from .tasks import TokenizerTask

__all__ = [
    "Engine",
    "Task",
    "Callback",
    "TokenizerTask",
    "SemanticTask",
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
