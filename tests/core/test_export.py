"""Exported ONNX graphs read back with ONNX Runtime alone: the torch path's codes and images, and clear errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from dualtoken.errors import CheckpointError, CodesError, ImageError
from dualtoken.export import ExportedTokenizer, export_onnx


@pytest.fixture
def exported(tiny_tokenizer, tmp_path):
    return export_onnx(tiny_tokenizer, tmp_path / "onnx")


def test_exported_graphs_match_the_torch_path(tiny_tokenizer, tiny_images, exported):
    manifest = json.loads((exported / "manifest.json").read_text())
    assert manifest["input_size"] == [64, 64] and manifest["grid"] == [8, 8]
    assert manifest["depths"] == {"pixel": 4, "semantic": 4} and manifest["opset"] == 17
    runtime = ExportedTokenizer(exported)
    pixel, semantic = runtime.encode(tiny_images.numpy())
    eager = tiny_tokenizer.encode(tiny_images, precision="fp32", backend="torch")
    assert pixel.shape == (2, 8, 8, 4) and pixel.dtype == np.int64
    assert (torch.from_numpy(pixel) != eager.pixel).float().mean() <= 0.001
    assert (torch.from_numpy(semantic) != eager.semantic).float().mean() <= 0.001
    for depth in (1, 3):
        reference = tiny_tokenizer.decode(eager.pixel[..., :depth], precision="fp32", backend="torch")
        decoded = runtime.decode(eager.pixel[..., :depth].numpy())
        assert np.abs(decoded - reference.detach().numpy()).max() < 1e-4


def test_bad_input_names_the_problem(exported, tiny_images):
    runtime = ExportedTokenizer(exported)
    with pytest.raises(ImageError, match=r"expected float32 images \(B, 3, 64, 64\)"):
        runtime.encode(np.zeros((1, 3, 32, 32), np.float32))
    with pytest.raises(CodesError, match="1 <= k <= 4"):
        runtime.decode(np.zeros((1, 8, 8, 5), np.int64))
    with pytest.raises(CodesError, match="got values in"):
        runtime.decode(np.full((1, 8, 8, 2), 256))


def test_broken_exports_are_one_clear_error(exported, tmp_path):
    with pytest.raises(CheckpointError, match="no manifest.json"):
        ExportedTokenizer(tmp_path)
    manifest = json.loads((exported / "manifest.json").read_text())
    (exported / "manifest.json").write_text(json.dumps({**manifest, "dualtoken_version": "0.0.1"}))
    with pytest.raises(CheckpointError, match="written by dualtoken 0.0.1.*re-export"):
        ExportedTokenizer(exported)
    (exported / "manifest.json").write_text(json.dumps(manifest))
    (exported / "decoder.onnx").write_bytes(b"not a graph")
    with pytest.raises(CheckpointError, match="decoder.onnx: not a readable ONNX graph"):
        ExportedTokenizer(exported)
    (exported / "decoder.onnx").unlink()
    with pytest.raises(CheckpointError, match="decoder.onnx: missing"):
        ExportedTokenizer(exported)
