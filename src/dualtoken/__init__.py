"""DualToken: one vision tokenizer, two residual-quantized vocabularies (pixel and semantic)."""

from .config import DecoderConfig, QuantizerConfig, TokenizerConfig
from .errors import (
    CheckpointError,
    CodesError,
    ConfigError,
    DamagedInstallError,
    DataError,
    DualTokenError,
    ImageError,
)
from .registry import get_config, list_mllms, list_models
from .tokenizer import DualTokenizer, DualTokenizerOutput, DualTokens
from .tokenizer_pair import TokenizerPair, load_visual_tokenizer

__version__ = "0.1.0"

__all__ = [
    "DualTokenizer",
    "DualTokens",
    "DualTokenizerOutput",
    "TokenizerPair",
    "load_visual_tokenizer",
    "TokenizerConfig",
    "QuantizerConfig",
    "DecoderConfig",
    "get_config",
    "list_models",
    "list_mllms",
    "DualTokenError",
    "ConfigError",
    "ImageError",
    "CodesError",
    "CheckpointError",
    "DamagedInstallError",
    "DataError",
]
