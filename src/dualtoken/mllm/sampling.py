"""Choosing a token from logits: classifier-free guidance, temperature, top-k, top-p (nucleus), seeded."""

from __future__ import annotations

import torch


def guide(conditional: torch.Tensor, unconditional: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance on logits: l_u + s·(l_c − l_u); s = 1 gives the conditional logits."""
    return unconditional + scale * (conditional - unconditional)


def filter_logits(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Set to -inf every logit outside the ``top_k`` largest (0 = all) and outside the smallest set whose
    probability reaches ``top_p`` (1 = all). The most likely token always survives."""
    logits = logits.float()
    if 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        ordered, order = torch.sort(logits, dim=-1, descending=True)
        cumulative = ordered.softmax(dim=-1).cumsum(dim=-1)
        drop = cumulative - ordered.softmax(dim=-1) >= top_p  # mass before a token already reaches top_p
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(-1, order, drop), float("-inf"))
    return logits


def sample(
    logits: torch.Tensor, temperature: float, top_k: int, top_p: float, generator: torch.Generator | None
) -> torch.Tensor:
    """One token per row of ``logits`` (..., V) -> (...); temperature 0 is the argmax.

    Drawn by the inverse of each row's cumulative distribution, one uniform number per row (``torch.multinomial``
    draws V exponential numbers per row: with 16,384 codes that was a quarter of image generation on a CPU)."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    probs = filter_logits(logits / temperature, top_k, top_p).softmax(dim=-1)
    cumulative = probs.reshape(-1, probs.shape[-1]).cumsum(dim=-1)  # (rows, V)
    uniform = torch.rand(cumulative.shape[0], 1, generator=generator, device=probs.device)  # (rows, 1)
    # the first token whose cumulative probability exceeds u·total: never one of probability 0
    chosen = torch.searchsorted(cumulative, uniform * cumulative[:, -1:], right=True)
    return chosen.clamp_(max=probs.shape[-1] - 1).view(probs.shape[:-1])
