"""Training: the trainer (one process or torchrun DDP / FSDP2), its config, optimisers, freeze presets,
resumable checkpoints and metric sinks. ``dualtoken train --config FILE`` runs :func:`train`."""

from .config import (
    CheckpointConfig,
    DataConfig,
    FreezeConfig,
    LogConfig,
    OptimizerConfig,
    TrainConfig,
    load_train_config,
)
from .trainer import Trainer, train

__all__ = [
    "Trainer",
    "train",
    "TrainConfig",
    "DataConfig",
    "OptimizerConfig",
    "FreezeConfig",
    "CheckpointConfig",
    "LogConfig",
    "load_train_config",
]
