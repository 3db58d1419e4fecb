"""Codebook usage numbers of known code distributions."""

import math

import torch

from dualtoken.evaluation.codebook_stats import code_histogram, codebook_report, usage_stats


def test_histogram_counts_every_depth_separately():
    codes = torch.tensor([[[[0, 3], [1, 3]], [[1, 3], [2, 0]]]])  # (1, 2, 2, Q=2)
    table = code_histogram(codes, codebook_size=4)
    assert table.tolist() == [[1, 2, 1, 0], [1, 0, 0, 3]]


def test_uniform_use_has_full_entropy_and_perplexity_k():
    stats = usage_stats(torch.full((16,), 5))
    assert stats["codes_used"] == 16 and stats["dead_codes"] == 0
    assert math.isclose(stats["entropy_bits"], 4.0) and math.isclose(stats["normalized_entropy"], 1.0)
    assert math.isclose(stats["perplexity"], 16.0)


def test_a_single_code_has_zero_entropy():
    counts = torch.zeros(8, dtype=torch.long)
    counts[5] = 40
    stats = usage_stats(counts)
    assert stats["codes_used"] == 1 and stats["dead_codes"] == 7 and stats["tokens"] == 40
    assert stats["entropy_bits"] == 0.0 and stats["perplexity"] == 1.0


def test_report_pools_depths():
    codes = torch.stack([torch.zeros(1, 2, 2), torch.ones(1, 2, 2)], dim=-1).long()  # depth 1: code 0, depth 2: code 1
    report = codebook_report(code_histogram(codes, 4))
    assert [d["codes_used"] for d in report["per_depth"]] == [1, 1]
    assert report["all_depths"]["codes_used"] == 2 and math.isclose(report["all_depths"]["entropy_bits"], 1.0)
