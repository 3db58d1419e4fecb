"""DualToken: one vision tokenizer, two residual-quantized vocabularies (pixel and semantic)."""

import os

# PyTorch's OpenMP (libgomp) keeps an idle thread spinning for milliseconds after each parallel region; the compiled
# search (dualtoken.search_kernel) runs on Python threads right after its first-pass matmul, and a spinning thread
# took a core from it (encoding 240 photos: 25 against 30 images/s on 2 cores). A short spin, unless one is set;
# it takes effect only where torch is not imported yet (docs/PERFORMANCE.md).
os.environ.setdefault("GOMP_SPINCOUNT", "10000")

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
