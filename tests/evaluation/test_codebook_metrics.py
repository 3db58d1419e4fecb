"""`--metrics codebook`: usage, perplexity and encode-decode-encode stability per depth, for shared and per-depth
codebooks."""

from __future__ import annotations

import json

import pytest
import torch

from dualtoken import DualTokenizer, get_config
from dualtoken.cli.main import main
from dualtoken.config import apply_overrides
from dualtoken.evaluation import EvalConfig, evaluate


def per_depth_tokenizer() -> DualTokenizer:
    torch.manual_seed(0)
    config = apply_overrides(get_config("dualtoken-tiny"), ["pixel_quantizer.codebook_sharing=per_depth"])
    return DualTokenizer.from_config(config).eval()


def test_codebook_group_reports_stability_per_depth(tiny_tokenizer, image_folder):
    report = evaluate(tiny_tokenizer, image_folder, None, EvalConfig(metrics=("codebook",), batch_size=5),
                      progress=False)
    assert "stability" not in report  # its own group was not asked for
    both = evaluate(tiny_tokenizer, image_folder, None, EvalConfig(metrics=("codebook", "stability"), batch_size=5),
                    progress=False)
    for branch, depth in (("pixel", tiny_tokenizer.pixel_depth), ("semantic", tiny_tokenizer.semantic_depth)):
        rows = report["codebooks"][branch]["per_depth"]
        assert [row["depth"] for row in rows] == list(range(1, depth + 1))
        for row, again in zip(rows, both["stability"][branch], strict=True):
            assert 0.0 <= row["prefix_stability"] <= row["stability"] <= 1.0
            assert row["stability"] == again["agreement"] and row["prefix_stability"] == again["prefix_agreement"]
            assert 1.0 <= row["perplexity"] <= row["codes_used"] and 0.0 < row["usage"] <= 1.0


def test_stability_counts_codes_that_come_back(tiny_tokenizer, image_folder, monkeypatch):
    """Whatever the reconstruction, a tokenizer that always returns the same codes is perfectly stable."""
    original = tiny_tokenizer.encode
    first = {}

    def same_codes(images):
        tokens = original(images)
        return first.setdefault(len(images), tokens)

    monkeypatch.setattr(tiny_tokenizer, "encode", same_codes)
    report = evaluate(tiny_tokenizer, image_folder, None, EvalConfig(metrics=("codebook",), batch_size=5),
                      progress=False)
    assert all(row["stability"] == 1.0 for row in report["codebooks"]["pixel"]["per_depth"])


def test_per_depth_codebooks_through_save_load_and_the_cli(image_folder, tmp_path, capsys):
    tok = per_depth_tokenizer()
    model = tok.save_pretrained(tmp_path / "model")
    loaded = DualTokenizer.from_pretrained(model)
    assert loaded.pixel.quantizer.codebook.shape == (4, 256, tok.config.pixel_quantizer.code_dim)
    torch.testing.assert_close(loaded.pixel.quantizer.codebook, tok.pixel.quantizer.codebook)
    out = tmp_path / "eval"
    assert main(["eval", "--model", str(model), "--data", str(image_folder), "--out", str(out), "--metrics",
                 "codebook", "--batch-size", "5", "--no-progress"]) == 0
    book = json.loads((out / "report.json").read_text())["codebooks"]["pixel"]
    assert len(book["per_depth"]) == 4 and all("stability" in row for row in book["per_depth"])
    assert "prefix_stability" in (out / "report.md").read_text()  # a column of the codebook table


@pytest.mark.parametrize("saved_sharing", ["per_depth", "shared"])
def test_a_checkpoint_of_the_other_sharing_mode_names_both(saved_sharing, image_folder, tmp_path, capsys):
    torch.manual_seed(0)
    base = get_config("dualtoken-tiny")
    saved = DualTokenizer.from_config(apply_overrides(base, [f"pixel_quantizer.codebook_sharing={saved_sharing}"]))
    model = saved.save_pretrained(tmp_path / "model")
    other = "shared" if saved_sharing == "per_depth" else "per_depth"
    config = json.loads((model / "config.json").read_text())
    config["pixel_quantizer"]["codebook_sharing"] = other  # the config says one mode, the weights the other
    (model / "config.json").write_text(json.dumps(config))
    out = tmp_path / "eval"
    assert main(["eval", "--model", str(model), "--data", str(image_folder), "--out", str(out),
                 "--metrics", "codebook", "--no-progress"]) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and "Traceback" not in error
    assert f"codebook_sharing {saved_sharing}" in error and f"codebook_sharing {other}" in error
    assert "pixel.quantizer.codebook" in error and not (out / "report.json").exists()
