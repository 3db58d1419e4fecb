"""The unified MLLM (docs/METHOD.md "The unified MLLM"): understanding and generation with both DualToken vocabularies, on any
transformers decoder-only language model."""

from .config import (
    DepthHeadConfig,
    FusionConfig,
    LLMConfig,
    LoraSettings,
    LossConfig,
    MLLMConfig,
    MLLMDataConfig,
    MLLMTrainConfig,
    PromptConfig,
    SamplingConfig,
)
from .generation import GeneratedImages, answer, generate_images
from .model import DualTokenMLLM, MLLMBatch, MLLMLoss

__all__ = [
    "DualTokenMLLM",
    "MLLMBatch",
    "MLLMLoss",
    "GeneratedImages",
    "answer",
    "generate_images",
    "MLLMConfig",
    "LLMConfig",
    "PromptConfig",
    "FusionConfig",
    "DepthHeadConfig",
    "LossConfig",
    "SamplingConfig",
    "LoraSettings",
    "MLLMDataConfig",
    "MLLMTrainConfig",
]
