"""Codebook usage: per vocabulary and per depth, how many of the K codes are used and how evenly."""

from __future__ import annotations

import math

import torch


def code_histogram(codes: torch.Tensor, codebook_size: int) -> torch.Tensor:
    """Counts of every code at every depth: codes (B, h, w, Q) -> (Q, K) int64."""
    depth = codes.shape[-1]
    flat = codes.reshape(-1, depth).long()  # (N, Q)
    offsets = torch.arange(depth, device=codes.device) * codebook_size
    counts = torch.bincount((flat + offsets).reshape(-1), minlength=depth * codebook_size)
    return counts.reshape(depth, codebook_size)


def usage_stats(counts: torch.Tensor) -> dict:
    """Usage numbers of one count vector (K,): codes used, dead codes, entropy (bits), perplexity.

    ``normalized_entropy`` = entropy / log2 K (1 = uniform use of all K codes); perplexity = 2 ** entropy, the
    effective number of codes.
    """
    counts = counts.double()
    total = float(counts.sum())
    size = counts.numel()
    used = int((counts > 0).sum())
    if total == 0:
        return {"codes_used": 0, "dead_codes": size, "usage": 0.0, "entropy_bits": 0.0, "normalized_entropy": 0.0,
                "perplexity": 0.0, "tokens": 0}
    probs = counts[counts > 0] / total
    entropy = float(-(probs * probs.log2()).sum())
    return {
        "codes_used": used,
        "dead_codes": size - used,
        "usage": used / size,
        "entropy_bits": entropy,
        "normalized_entropy": entropy / math.log2(size) if size > 1 else 0.0,
        "perplexity": 2.0**entropy,
        "tokens": int(total),
    }


def codebook_report(histogram: torch.Tensor, stability: list[dict] | None = None) -> dict:
    """Per-depth and all-depths-pooled usage numbers of one vocabulary from its (Q, K) count table.

    ``stability`` (one ``{"depth", "agreement", "prefix_agreement"}`` per depth, from re-encoding the
    reconstructions) adds each depth's ``stability`` (share of positions whose code comes back) and
    ``prefix_stability`` (whose codes 1..q all come back).
    """
    per_depth = [{"depth": q + 1, **usage_stats(histogram[q])} for q in range(histogram.shape[0])]
    for entry, again in zip(per_depth, stability or [], strict=False):
        entry["stability"] = again["agreement"]
        entry["prefix_stability"] = again["prefix_agreement"]
    return {"codebook_size": histogram.shape[1], "per_depth": per_depth, "all_depths": usage_stats(histogram.sum(dim=0))}
