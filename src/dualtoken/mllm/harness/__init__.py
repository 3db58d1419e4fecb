"""A DualToken MLLM behind a benchmark harness's two request kinds (docs/MLLM.md "Standard benchmarks").

Harnesses such as lmms-eval ask a model two things about a document (a question with its images):

    generate_until   context + images -> the answer text, cut at the task's stop strings
    loglikelihood    context + images + a continuation -> (log p(continuation | context, images), greedy?)

Both run here in batches on a :class:`DualTokenMLLM`, with the images tokenized by the MLLM's own DualToken
tokenizer at its size. This module needs no harness: ``harness.lmms`` wraps it in lmms-eval's model class, and
the tests call it directly.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image

from ...errors import CheckpointError, DataError
from ...io import resize_center_crop, to_tensor
from ..generation import answer
from ..model import DualTokenMLLM


@dataclass
class Question:
    """One request's input: the task's prompt text and the images of its document (at most one)."""

    context: str
    images: list[Image.Image] = field(default_factory=list)
    where: str = "request"  # names the document in errors, e.g. "cifar_qa/test/3"


def load_mllm(path: str | Path, device: str | torch.device = "cpu") -> DualTokenMLLM:
    """A saved MLLM folder (``DualTokenMLLM.save_pretrained``) in eval mode on ``device``; anything else raises
    CheckpointError naming the path."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path} is not a DualToken MLLM folder (no such directory)")
    return DualTokenMLLM.from_pretrained(path).to(device).eval()


def _codes(model: DualTokenMLLM, questions: Sequence[Question]) -> tuple[torch.Tensor, torch.Tensor]:
    """Both code maps (M, h, w, Q) of every image of ``questions``, in order, at the tokenizer's size."""
    size = model.visual_tokenizer.image_size
    images = []
    for question in questions:
        if len(question.images) > 1:
            raise DataError(
                f"{question.where}: {len(question.images)} images; the DualToken MLLM answers about one image "
                "per question"
            )
        for image in question.images:
            if not isinstance(image, Image.Image):
                raise DataError(f"{question.where}: expected a PIL image, got {type(image).__name__}")
            images.append(to_tensor(resize_center_crop(image.convert("RGB"), size)))
    if not images:
        empty = torch.zeros(0, *model.visual_tokenizer.grid, 1, dtype=torch.long, device=model.device)
        return empty, empty
    tokens = model.visual_tokenizer.encode(torch.stack(images).to(model.device))  # (M, 3, H, W) -> codes
    return tokens.pixel, tokens.semantic


def _batches(count: int, batch_size: int) -> list[range]:
    return [range(start, min(start + batch_size, count)) for start in range(0, count, batch_size)]


def cut_at_stops(text: str, until: Sequence[str]) -> str:
    """``text`` up to the first of the ``until`` strings (the harness's stop sequences)."""
    cut = min((text.find(stop) for stop in until if stop and stop in text), default=len(text))
    return text[:cut]


@torch.no_grad()
def generate_until(
    model: DualTokenMLLM,
    questions: Sequence[Question],
    until: Sequence[str] = (),
    max_new_tokens: int | None = None,
    temperature: float = 0.0,
    batch_size: int = 8,
    seed: int = 0,
) -> list[str]:
    """The model's answer to each question (greedy unless ``temperature`` > 0), cut at ``until``. Questions with
    and without an image may mix: each batch runs as two groups."""
    answers: list[str | None] = [None] * len(questions)
    for with_image in (True, False):
        rows = [i for i, q in enumerate(questions) if bool(q.images) == with_image]
        for chunk in _batches(len(rows), batch_size):
            picked = [questions[rows[i]] for i in chunk]
            codes = _codes(model, picked) if with_image else None
            texts = answer(
                model,
                [q.context for q in picked],
                codes,
                max_new_tokens=max_new_tokens,
                temperature=temperature,
                seed=seed,
            )
            for i, text in zip(chunk, texts):
                answers[rows[i]] = cut_at_stops(text, until).strip()
    return answers


def loglikelihood(
    model: DualTokenMLLM,
    questions: Sequence[Question],
    continuations: Sequence[str],
    batch_size: int = 8,
) -> list[tuple[float, bool]]:
    """(sum of log p over the continuation's tokens, whether greedy decoding gives exactly those tokens) for each
    question + continuation, the continuation taking the place of the assistant's answer."""
    if len(questions) != len(continuations):
        raise DataError(f"{len(questions)} questions but {len(continuations)} continuations")
    return token_loglikelihood(model, questions, [model.prompt.text(c) for c in continuations], batch_size)


@torch.no_grad()
def token_loglikelihood(
    model: DualTokenMLLM,
    questions: Sequence[Question],
    continuations: Sequence[list[int]],
    batch_size: int = 8,
) -> list[tuple[float, bool]]:
    """:func:`loglikelihood` of continuations given as text-token ids."""
    for question, target in zip(questions, continuations):
        if not target:
            raise DataError(f"{question.where}: an empty continuation has no likelihood to score")
        if model.prompt.slot_id in target:
            raise DataError(f"{question.where}: the continuation holds the image slot token")
    results = []
    for chunk in _batches(len(questions), batch_size):
        picked = [questions[i] for i in chunk]
        contexts = [model.prompt.chat_prompt(q.context, len(q.images)) for q in picked]
        targets = [list(continuations[i]) for i in chunk]
        length = max(len(c) + len(t) for c, t in zip(contexts, targets))
        ids = torch.full((len(picked), length), model.pad_id, dtype=torch.long)  # right-padded (B, T)
        mask = torch.zeros_like(ids)
        for row, (context, target) in enumerate(zip(contexts, targets)):
            ids[row, : len(context) + len(target)] = torch.tensor(context + target)
            mask[row, : len(context) + len(target)] = 1
        ids, mask = ids.to(model.device), mask.to(model.device)
        pixel, semantic = _codes(model, picked)
        logits = model.llm(inputs_embeds=model.embed(ids, pixel, semantic), attention_mask=mask).logits
        log_probs = F.log_softmax(logits.float(), dim=-1)  # (B, T, V)
        for row, (context, target) in enumerate(zip(contexts, targets)):
            # position t predicts token t + 1: the continuation's tokens are read from the positions before them
            span = log_probs[row, len(context) - 1 : len(context) + len(target) - 1]  # (len(target), V)
            wanted = torch.tensor(target, device=span.device)
            score = float(span.gather(-1, wanted[:, None]).sum())
            results.append((score, bool((span.argmax(-1) == wanted).all())))
    return results
