"""A small byte-level BPE text tokenizer trained locally (for LLMs trained from scratch, e.g. the CIFAR recipe)."""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path

from .config import PromptConfig

END_OF_TEXT = "<|endoftext|>"


def template_tokens(prompt: PromptConfig) -> list[str]:
    """The chat template's markers (ChatML by default) and the image markers: each becomes one special token."""
    text = prompt.user_prefix + prompt.user_suffix + prompt.assistant_prefix + prompt.assistant_suffix
    template = sorted(set(re.findall(r"<[^<>\s]+>", text)))  # e.g. <|im_start|>, <|im_end|>
    return template + prompt.special_tokens


def train_bpe_tokenizer(
    texts: Iterable[str], vocab_size: int, out_dir: str | Path, prompt: PromptConfig | None = None
):
    """Train a byte-level BPE on ``texts`` and save it as a transformers tokenizer folder; returns it loaded."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    prompt = prompt or PromptConfig()
    specials = [END_OF_TEXT] + template_tokens(prompt)
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(texts, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        eos_token=END_OF_TEXT,
        pad_token=END_OF_TEXT,
        additional_special_tokens=specials[1:],
    )
    tokenizer.save_pretrained(str(out_dir))
    return tokenizer
