"""Serving: the tokenization service behind ``dualtoken serve`` (HTTP API, micro-batching, limits, web page)."""

from .app import create_app
from .batcher import MicroBatcher, QueueFullError
from .config import ServeConfig
from .mllm import MultimodalModel

__all__ = ["create_app", "ServeConfig", "MicroBatcher", "QueueFullError", "MultimodalModel"]
