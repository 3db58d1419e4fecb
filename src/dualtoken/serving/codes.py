"""Code tensors at the API boundary: JSON nested lists in, validated LongTensors out, and per-vocabulary usage."""

from __future__ import annotations

from typing import Any

import torch

from ..errors import CodesError
from ..evaluation.codebook_stats import code_histogram, usage_stats


def codes_from_json(
    codes: Any, grid: tuple[int, int], max_depth: int, codebook_size: int, branch: str
) -> torch.Tensor:
    """A (h, w, q) nested list of ints -> LongTensor, with 1 <= q <= max_depth and every value in [0, K).

    Validated here, before the request joins a batch, so that a bad tensor is refused with a message naming the
    expected form instead of failing inside the model.
    """
    h, w = grid
    expected = f"a nested list of shape ({h}, {w}, q) with 1 <= q <= {max_depth} and integers in [0, {codebook_size})"
    if not isinstance(codes, list) or len(codes) != h:
        raise CodesError(f"{branch} codes: expected {expected}; got {_describe(codes)} rows")
    depth = None
    for row in codes:
        if not isinstance(row, list) or len(row) != w:
            raise CodesError(f"{branch} codes: expected {expected}; a row has {_describe(row)} columns")
        for cell in row:
            if not isinstance(cell, list):
                raise CodesError(
                    f"{branch} codes: expected {expected}; a position holds {type(cell).__name__}"
                )
            depth = len(cell) if depth is None else depth
            if len(cell) != depth:
                raise CodesError(f"{branch} codes: expected {expected}; positions hold different depths")
            for value in cell:
                if isinstance(value, bool) or not isinstance(value, int):
                    raise CodesError(f"{branch} codes: expected {expected}; found {value!r}")
                if not 0 <= value < codebook_size:
                    raise CodesError(f"{branch} codes: {value} is out of range; expected {expected}")
    if depth is None or not 1 <= depth <= max_depth:
        raise CodesError(f"{branch} codes: expected {expected}; got depth {depth}")
    return torch.tensor(codes, dtype=torch.long)  # (h, w, q)


def _describe(value: Any) -> str:
    return str(len(value)) if isinstance(value, list) else f"a {type(value).__name__}, not"


def code_usage(codes: torch.Tensor, codebook_size: int, top: int, bins: int) -> dict[str, Any]:
    """Which codes one image uses in one vocabulary: (h, w, Q) codes -> a JSON-ready summary.

    ``unique`` counts distinct codes over all depths, ``per_depth_unique`` within each depth (at most
    min(K, ``positions``)) and ``per_depth_perplexity`` the effective number of codes of each depth (2 ** entropy of
    its code frequencies), ``top`` lists the most used [code, count] pairs, and ``histogram`` counts uses in
    ``bins`` equal ranges of the codebook (for a usage strip on the page).
    """
    flat = codes.reshape(-1)
    counts = torch.bincount(flat, minlength=codebook_size)  # (K,)
    used = int((counts > 0).sum())
    order = torch.argsort(counts, descending=True, stable=True)[: min(top, used)]
    bins = min(bins, codebook_size)
    bin_of_code = torch.arange(codebook_size) * bins // codebook_size  # (K,)
    histogram = torch.zeros(bins, dtype=torch.long).index_add_(0, bin_of_code, counts)
    return {
        "unique": used,
        "codebook_fraction": used / codebook_size,
        "per_depth_unique": [int(codes[..., d].unique().numel()) for d in range(codes.shape[-1])],
        "per_depth_perplexity": [stats["perplexity"] for stats in map(usage_stats, code_histogram(codes, codebook_size))],
        "positions": int(codes[..., 0].numel()),
        "top": [[int(code), int(counts[code])] for code in order],
        "histogram": histogram.tolist(),
    }
