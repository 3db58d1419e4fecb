"""Fixtures of the MLLM tests: a locally trained BPE, a 2-layer random Llama, the random dualtoken-tiny tokenizer."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from dualtoken.mllm import DepthHeadConfig, DualTokenMLLM, LLMConfig, MLLMConfig, SamplingConfig
from dualtoken.mllm.data import RenderedItem, collate
from dualtoken.mllm.text_tokenizer import train_bpe_tokenizer

CLASSES = ["airplane", "cat", "dog", "ship"]
CORPUS = [
    f"<|im_start|>user\nWhat is in this image?<|im_end|>\n<|im_start|>assistant\nIt is a {c}.<|im_end|>\nDraw a {c}."
    for c in CLASSES
] * 10


def tiny_llm(vocab_size: int, model_type: str = "llama") -> dict:
    return {
        "model_type": model_type,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": vocab_size,
        "max_position_embeddings": 512,
    }


@pytest.fixture
def llm_architecture():
    """llm_architecture(vocab_size, model_type="llama") -> a 2-layer, 64-wide transformers config dict."""
    return tiny_llm


@pytest.fixture(scope="session")
def text_tokenizer_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bpe")
    train_bpe_tokenizer(CORPUS, 300, folder)
    return folder


@pytest.fixture
def mllm_config(text_tokenizer_dir) -> MLLMConfig:
    return MLLMConfig(
        tokenizer="tokenizer",
        llm=LLMConfig(architecture=tiny_llm(300), text_tokenizer=str(text_tokenizer_dir)),
        heads=DepthHeadConfig(layers=2, width=32, num_heads=4, dropout=0.0),
        sampling=SamplingConfig(top_k=50, top_p=0.95, max_new_tokens=12),
    )


@pytest.fixture
def make_mllm(mllm_config, tiny_tokenizer):
    """make_mllm(seed=0, **config_sections) -> a fresh random DualTokenMLLM on the tiny tokenizer."""

    def make(seed: int = 0, **changes) -> DualTokenMLLM:
        torch.manual_seed(seed)
        return DualTokenMLLM.from_config(
            dataclasses.replace(mllm_config, **changes), visual_tokenizer=tiny_tokenizer
        )

    return make


@pytest.fixture
def tiny_codes(tiny_tokenizer, tiny_images):
    """Both code maps (2, 8, 8, 4) of the two tiny images."""
    return tiny_tokenizer.encode(tiny_images)


def _mixed_batch(model: DualTokenMLLM, codes):
    understanding = model.prompt.conversation(
        [("user", "<image>\nWhat is in this image?"), ("assistant", "It is a cat.")], 1
    )
    generation = model.prompt.generation("Draw a dog.")
    items = [
        RenderedItem(understanding, codes.pixel[:1], codes.semantic[:1]),
        RenderedItem(generation, codes.pixel[1:], codes.semantic[1:]),
    ]
    return collate(items, model.pad_id)


@pytest.fixture
def mixed_batch():
    """mixed_batch(model, codes): one understanding conversation about image 0, one generation sample of image 1."""
    return _mixed_batch


@pytest.fixture(scope="session")
def cifar_recipe():
    """recipes/mllm_cifar/run.py as a module (its stages: extract_split, prepare, ...)."""
    import importlib.util
    import sys
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "recipes" / "mllm_cifar" / "run.py"
    spec = importlib.util.spec_from_file_location("mllm_cifar_run", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module
