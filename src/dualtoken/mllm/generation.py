"""Inference: answers (text, greedy or sampled) and images (both vocabularies, depth by depth, with
classifier-free guidance), on the LLM's KV cache or without it (the two agree; the uncached path is the check).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from .depth_head import DepthTransformer
from .fusion import BRANCHES, CodeTables
from .sampling import guide, sample

if TYPE_CHECKING:  # the model calls this module for inference; the type only names it
    from .model import DualTokenMLLM


class LLMDecoder:
    """Runs the LLM over a left-padded batch that grows by one position per step, and returns the last
    position's final hidden state and logits. With ``use_cache`` each step feeds only the new position."""

    def __init__(self, llm: torch.nn.Module, use_cache: bool) -> None:
        self.llm = llm
        self.use_cache = use_cache
        self.embeds: torch.Tensor | None = None  # (B, T, width), kept only without the cache
        self.mask: torch.Tensor | None = None  # (B, T)
        self.past = None

    def _run(self, embeds: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        positions = (self.mask.cumsum(-1) - 1).clamp(min=0)[:, -embeds.shape[1] :]  # skip the left padding
        out = self.llm(
            inputs_embeds=embeds,
            attention_mask=self.mask,
            position_ids=positions,
            past_key_values=self.past,
            use_cache=self.use_cache,
            output_hidden_states=True,
        )
        self.past = out.past_key_values if self.use_cache else None
        return out.hidden_states[-1][:, -1].float(), out.logits[:, -1].float()

    def start(self, embeds: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.mask, self.past = mask, None
        self.embeds = None if self.use_cache else embeds
        return self._run(embeds)

    def step(self, embeds: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``embeds`` (B, 1, width): the next position of every row."""
        self.mask = torch.cat([self.mask, self.mask.new_ones(self.mask.shape[0], 1)], dim=1)
        if self.use_cache:
            return self._run(embeds)
        self.embeds = torch.cat([self.embeds, embeds], dim=1)
        return self._run(self.embeds)


def _generator(device: torch.device, seed: int) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


# ----------------------------------------------------------------------------------------------------------------
# images
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class GeneratedImages:
    pixel_codes: torch.Tensor  # (B, h, w, Qp)
    semantic_codes: torch.Tensor  # (B, h, w, Qs)
    images: torch.Tensor | None  # (B, 3, H, W), [-1, 1] scale, unclamped; None when not decoded


def _sample_stack(
    head: DepthTransformer,
    tables: CodeTables,
    branch: str,
    states: torch.Tensor,
    scale: float | None,
    temperature: float,
    top_k: int,
    top_p: float,
    generator: torch.Generator,
) -> torch.Tensor:
    """The Q codes of one position per row, depth by depth. With guidance, ``states`` is [conditional;
    unconditional] (2B rows), the logits are guided per depth and each chosen code is fed to both halves."""
    rows = states.shape[0] // 2 if scale is not None else states.shape[0]
    codebook = tables.codebook(branch)  # (K, code_dim), or (Q, K, code_dim) with one codebook per depth
    previous = states.new_zeros(states.shape[0], 0, codebook.shape[-1])  # (rows, d-1, code_dim)
    chosen = []
    for depth in range(head.depth):
        logits = head(states, previous, last_only=True, codebook=codebook)  # (rows, K)
        if scale is not None:
            logits = guide(logits[:rows], logits[rows:], scale)
        code = sample(logits, temperature, top_k, top_p, generator)  # (B,)
        chosen.append(code)
        vector = tables.vectors(code.unsqueeze(-1), branch, first_depth=depth)[:, 0]  # (B, code_dim)
        if scale is not None:
            vector = torch.cat([vector, vector])
        previous = torch.cat([previous, vector.unsqueeze(1).to(previous.dtype)], dim=1)
    return torch.stack(chosen, dim=-1)  # (B, Q)


@torch.no_grad()
def generate_images(
    model: DualTokenMLLM,
    prompts: list[str],
    cfg_scale: float | None = None,
    temperature: float | None = None,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int = 0,
    use_cache: bool = True,
    decode: bool = True,
) -> GeneratedImages:
    """One image per prompt: h·w positions, each both code stacks, fed back as the next input (docs/METHOD.md "Generation").

    ``cfg_scale`` 1 turns guidance off; None values take ``model.config.sampling``. The same seed gives the same
    images. Only the pixel codes are decoded (with the DualToken tokenizer).
    """
    was_training = model.training
    model.eval()
    defaults = model.config.sampling
    scale = defaults.cfg_scale if cfg_scale is None else cfg_scale
    scale = None if scale == 1.0 else scale
    options = {
        "temperature": defaults.temperature if temperature is None else temperature,
        "top_k": defaults.top_k if top_k is None else top_k,
        "top_p": defaults.top_p if top_p is None else top_p,
    }
    rows = len(prompts)
    ids = [model.prompt.generation_prompt(p) for p in prompts]
    if scale is not None:
        ids += [model.prompt.generation_prompt(model.config.prompt.blank_prompt)] * rows
    input_ids, mask = model.pad_prompts(ids)
    empty = torch.zeros(0, *model.visual_tokenizer.grid, 1, dtype=torch.long, device=model.device)
    decoder = LLMDecoder(model.llm, use_cache)
    states, _ = decoder.start(model.embed(input_ids, empty, empty), mask)
    generator = _generator(model.device, seed)
    codes = {branch: [] for branch in BRANCHES}
    for position in range(model.tokens_per_image):
        step = {
            branch: _sample_stack(
                model.head(branch),
                model.code_tables,
                branch,
                states,
                scale,
                generator=generator,
                **options,
            )
            for branch in BRANCHES
        }
        for branch in BRANCHES:
            codes[branch].append(step[branch])
        if position + 1 == model.tokens_per_image:
            break
        fused = model.fuse(step["pixel"], step["semantic"])  # (B, width)
        if scale is not None:
            fused = torch.cat([fused, fused])
        states, _ = decoder.step(fused.unsqueeze(1).to(model.llm.get_input_embeddings().weight.dtype))
    h, w = model.visual_tokenizer.grid
    pixel, semantic = (torch.stack(codes[b], dim=1).view(rows, h, w, -1) for b in BRANCHES)
    images = model.visual_tokenizer.decode(pixel) if decode else None
    model.train(was_training)
    return GeneratedImages(pixel, semantic, images)


# ----------------------------------------------------------------------------------------------------------------
# answers
# ----------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def answer(
    model: DualTokenMLLM,
    questions: list[str],
    codes: tuple[torch.Tensor, torch.Tensor] | None,
    max_new_tokens: int | None = None,
    temperature: float | None = None,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int = 0,
    use_cache: bool = True,
) -> list[str]:
    """Answer each question about its image. ``codes`` = (pixel, semantic), each (B, h, w, Q), one image per
    question (or None: text only). Stops at the template's end of turn or the end-of-sequence token."""
    was_training = model.training
    model.eval()
    defaults = model.config.sampling
    max_new_tokens = defaults.max_new_tokens if max_new_tokens is None else max_new_tokens
    temperature = defaults.text_temperature if temperature is None else temperature
    top_k = defaults.text_top_k if top_k is None else top_k
    top_p = defaults.text_top_p if top_p is None else top_p
    images = 0 if codes is None else 1
    if codes is None:
        empty = torch.zeros(0, *model.visual_tokenizer.grid, 1, dtype=torch.long)
        codes = (empty, empty)
    input_ids, mask = model.pad_prompts([model.prompt.chat_prompt(q, images) for q in questions])
    pixel, semantic = (c.to(model.device) for c in codes)
    decoder = LLMDecoder(model.llm, use_cache)
    _, logits = decoder.start(model.embed(input_ids, pixel, semantic), mask)
    generator = _generator(model.device, seed)
    tokenizer, stop = model.text_tokenizer, model.prompt.stop_text
    generated = [[] for _ in questions]
    finished = [False] * len(questions)
    for _ in range(max_new_tokens):
        chosen = sample(logits, temperature, top_k, top_p, generator)  # (B,)
        for row, token in enumerate(chosen.tolist()):
            if finished[row]:
                continue
            generated[row].append(token)
            text = tokenizer.decode(generated[row], skip_special_tokens=False)
            finished[row] = token == tokenizer.eos_token_id or stop in text
        if all(finished):
            break
        _, logits = decoder.step(model.llm.get_input_embeddings()(chosen).unsqueeze(1))
    answers = []
    for tokens in generated:
        if tokens and tokens[-1] == tokenizer.eos_token_id:
            tokens = tokens[:-1]
        answers.append(tokenizer.decode(tokens, skip_special_tokens=False).split(stop)[0].strip())
    model.train(was_training)
    return answers
