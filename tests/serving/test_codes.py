"""Code tensors from JSON: every malformed form is refused with its reason; usage summaries count correctly."""

from __future__ import annotations

import math

import pytest
import torch

from dualtoken.errors import CodesError
from dualtoken.serving.codes import code_usage, codes_from_json

GRID, DEPTH, K = (2, 3), 4, 16


def grid_of(cell):
    return [[list(cell) for _ in range(GRID[1])] for _ in range(GRID[0])]


def test_a_valid_prefix_becomes_a_long_tensor():
    codes = codes_from_json(grid_of([1, 2]), GRID, DEPTH, K, "pixel")
    assert codes.dtype == torch.long and codes.shape == (2, 3, 2)
    assert codes[..., 1].eq(2).all()


@pytest.mark.parametrize(
    "codes, message",
    [
        ([], "got 0 rows"),
        ("abc", "a str, not rows"),
        ([[[1]] * 3], "got 1 rows"),
        ([[[1]] * 3, [[1]] * 2], "a row has 2 columns"),
        ([[[1]] * 3, [[1], [1], 5]], "a position holds int"),
        ([[[1]] * 3, [[1], [1], [1, 2]]], "different depths"),
        (grid_of([]), "got depth 0"),
        (grid_of([1] * 5), "got depth 5"),
        (grid_of([16]), "16 is out of range"),
        (grid_of([-1]), "-1 is out of range"),
        (grid_of([10**30]), "out of range"),
        (grid_of([1.5]), "found 1.5"),
        (grid_of([True]), "found True"),
    ],
)
def test_malformed_codes_are_refused(codes, message):
    with pytest.raises(CodesError, match=message) as error:
        codes_from_json(codes, GRID, DEPTH, K, "pixel")
    assert "(2, 3, q)" in str(error.value)  # names the expected form


def test_code_usage_counts():
    codes = torch.tensor([[[0, 5], [0, 5]], [[0, 6], [15, 5]]])  # (2, 2, 2)
    usage = code_usage(codes, codebook_size=16, top=2, bins=4)
    assert usage["unique"] == 4
    assert usage["codebook_fraction"] == 4 / 16
    assert usage["per_depth_unique"] == [2, 2]
    assert usage["positions"] == 4
    three_and_one = 2 ** -(0.75 * math.log2(0.75) + 0.25 * math.log2(0.25))  # each depth: one code 3 times, one once
    assert usage["per_depth_perplexity"] == pytest.approx([three_and_one, three_and_one])
    assert usage["top"] == [[0, 3], [5, 3]]
    assert usage["histogram"] == [3, 4, 0, 1]  # codes 0-3, 4-7, 8-11, 12-15
    assert sum(usage["histogram"]) == codes.numel()
