"""A tokenizer as ONNX graphs: for the fast CPU backend (:mod:`dualtoken.backend`) and for deployment without PyTorch.

Three graphs, each a small ``nn.Module`` over the tokenizer's own methods, exported with ``torch.onnx``:

- taps:   images (B, 3, H, W) -> pixel latent, semantic latent (B, h*w, D) (the backend searches them exactly);
- codes:  images -> pixel codes, semantic codes (B, h, w, Q): the taps, then the residual search as plain ONNX ops
          (per depth: ``||e||^2 / 2 - r.e`` for every code, ArgMin, Gather, Sub), for ``export_onnx``;
- pixels: pixel codes (B, h, w, k), any first k depths -> images (B, 3, H, W): lookup, sum, up-projection, decoder.

``export_onnx(tokenizer, folder)`` writes ``encoder.onnx`` (codes), ``decoder.onnx`` (pixels) and
``manifest.json``; :class:`ExportedTokenizer` reads them back with ONNX Runtime alone and checks what it is given.
"""

from __future__ import annotations

import json
import warnings
from importlib.metadata import version
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .errors import CheckpointError, CodesError, ImageError

if TYPE_CHECKING:
    from .quantizer import ResidualQuantizer
    from .tokenizer import DualTokenizer

OPSET = 17
MANIFEST = "manifest.json"
FORMAT = "dualtoken-onnx/1"


class _Taps(nn.Module):
    def __init__(self, tokenizer: DualTokenizer) -> None:
        super().__init__()
        self.tokenizer = tokenizer

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        taps = self.tokenizer._run_to_taps(images)
        return taps.pixel_latent, taps.semantic_latent  # (B, h*w, Dp), (B, h*w, Ds)


class _Codes(_Taps):
    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pixel_latent, semantic_latent = super().forward(images)
        grid = (images.shape[0], *self.tokenizer.grid, -1)
        pixel = graph_search(pixel_latent, self.tokenizer.quantizer("pixel")).reshape(grid)
        semantic = graph_search(semantic_latent, self.tokenizer.quantizer("semantic")).reshape(grid)
        return pixel, semantic  # (B, h, w, Qp), (B, h, w, Qs)


class _Pixels(nn.Module):
    def __init__(self, tokenizer: DualTokenizer) -> None:
        super().__init__()
        self.tokenizer = tokenizer

    def forward(self, pixel_codes: torch.Tensor) -> torch.Tensor:
        latent = self.tokenizer.quantizer("pixel").decode(pixel_codes)  # (B, h, w, D)
        return self.tokenizer.decoder(self.tokenizer.pixel.up(latent.flatten(1, 2)))  # (B, 3, H, W)


def graph_search(latent: torch.Tensor, quantizer: ResidualQuantizer) -> torch.Tensor:
    """Residual codes (B, N, Q) of ``latent`` (B, N, D) in ops every ONNX runtime has: per depth the scores
    ``||e||^2 / 2 - r.e`` of every code (half the distance less ``||r||^2 / 2``), their argmin, the residual update.
    Float32 throughout, so a row whose two nearest codes lie within rounding of each other may pick the other one;
    the package's own search (:func:`dualtoken.quantizer.residual_codes`) settles those rows exactly."""
    residual, codes = latent, []
    for depth in range(quantizer.depth):
        codebook = quantizer.depth_codebook(depth)  # (K, D)
        scores = codebook.pow(2).sum(dim=1) / 2 - residual @ codebook.t()  # (B, N, K)
        code = scores.argmin(dim=-1)  # (B, N)
        residual = residual - F.embedding(code, codebook)
        codes.append(code)
    return torch.stack(codes, dim=-1)


def _export(module: nn.Module, example: torch.Tensor, path: Path, inputs: list[str], outputs: list[str],
            dynamic: dict[str, dict[int, str]]) -> None:
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation and tracer notes
        torch.onnx.export(
            module.eval(), (example,), str(path), dynamo=False, opset_version=OPSET,
            input_names=inputs, output_names=outputs, dynamic_axes=dynamic,
        )


def _example_images(tokenizer: DualTokenizer) -> torch.Tensor:
    return torch.zeros(2, 3, *tokenizer.image_size)


def export_taps_graph(tokenizer: DualTokenizer, path: Path) -> None:
    """images -> (pixel_latent, semantic_latent): what the onnxruntime backend runs before its exact search."""
    _export(_Taps(tokenizer), _example_images(tokenizer), path, ["images"], ["pixel_latent", "semantic_latent"],
            {"images": {0: "batch"}, "pixel_latent": {0: "batch"}, "semantic_latent": {0: "batch"}})


def export_codes_graph(tokenizer: DualTokenizer, path: Path) -> None:
    """images -> (pixel_codes, semantic_codes), the search included."""
    _export(_Codes(tokenizer), _example_images(tokenizer), path, ["images"], ["pixel_codes", "semantic_codes"],
            {"images": {0: "batch"}, "pixel_codes": {0: "batch"}, "semantic_codes": {0: "batch"}})


def export_pixels_graph(tokenizer: DualTokenizer, path: Path) -> None:
    """pixel codes (B, h, w, k) -> images, for any batch and any number k of first depths."""
    depth = tokenizer.pixel_depth
    example = torch.zeros(2, *tokenizer.grid, depth, dtype=torch.long)
    _export(_Pixels(tokenizer), example, path, ["pixel_codes"], ["images"],
            {"pixel_codes": {0: "batch", 3: "depths"}, "images": {0: "batch"}})


def export_onnx(tokenizer: DualTokenizer, folder: str | Path) -> Path:
    """Write ``encoder.onnx`` (images -> codes of both vocabularies), ``decoder.onnx`` (pixel codes -> images) and
    ``manifest.json`` (what a runtime needs to feed and read them) into ``folder``; returns the folder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = tokenizer.eval()
    export_codes_graph(tokenizer, folder / "encoder.onnx")
    export_pixels_graph(tokenizer, folder / "decoder.onnx")
    height, width = tokenizer.image_size
    manifest = {
        "format": FORMAT,
        "dualtoken_version": version("dualtoken"),
        "model": tokenizer.name_or_path or tokenizer.config.name,
        "opset": OPSET,
        "encoder": {"file": "encoder.onnx", "input": "images", "outputs": ["pixel_codes", "semantic_codes"]},
        "decoder": {"file": "decoder.onnx", "input": "pixel_codes", "output": "images"},
        "input_size": [height, width],
        "input_layout": "NCHW float32 RGB",
        "normalisation": "x = uint8 / 127.5 - 1 (values in [-1, 1]); shortest side resized to the input size, "
        "then the centre crop",
        "output_range": "[-1, 1] scale, unclamped: uint8 = clip((y + 1) * 127.5, 0, 255)",
        "grid": list(tokenizer.grid),
        "depths": {"pixel": tokenizer.pixel_depth, "semantic": tokenizer.semantic_depth},
        "codebook_sizes": {"pixel": tokenizer.codebook_size("pixel"), "semantic": tokenizer.codebook_size("semantic")},
    }
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return folder


class ExportedTokenizer:
    """The graphs of :func:`export_onnx` in ONNX Runtime, with the manifest's checks: numpy in, numpy out."""

    def __init__(self, folder: str | Path, threads: int | None = None) -> None:
        import onnxruntime as ort

        folder = Path(folder)
        manifest_path = folder / MANIFEST
        if not manifest_path.is_file():
            raise CheckpointError(f"{folder}: no {MANIFEST}; expected a folder written by `dualtoken export onnx`")
        try:
            manifest = json.loads(manifest_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise CheckpointError(f"{manifest_path}: not valid JSON ({exc.msg if hasattr(exc, 'msg') else exc})") from exc
        if manifest.get("format") != FORMAT:
            raise CheckpointError(
                f"{manifest_path}: format {manifest.get('format')!r}, expected {FORMAT!r} (re-export with this "
                "version: dualtoken export onnx MODEL OUT_DIR)"
            )
        ours = version("dualtoken")
        if manifest.get("dualtoken_version") != ours:
            raise CheckpointError(
                f"{manifest_path}: written by dualtoken {manifest.get('dualtoken_version')}, this is {ours}; "
                "re-export with: dualtoken export onnx MODEL OUT_DIR"
            )
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        options.log_severity_level = 3
        self.manifest = manifest
        self.input_size = tuple(manifest["input_size"])
        self.grid = tuple(manifest["grid"])
        self.depths = manifest["depths"]
        self.codebook_sizes = manifest["codebook_sizes"]
        self.encoder = self._session(folder / manifest["encoder"]["file"], options)
        self.decoder = self._session(folder / manifest["decoder"]["file"], options)

    @staticmethod
    def _session(path: Path, options):
        import onnxruntime as ort

        if not path.is_file():
            raise CheckpointError(f"{path}: missing; expected the graph `dualtoken export onnx` writes there")
        try:
            return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own exception types for unreadable graphs
            raise CheckpointError(f"{path}: not a readable ONNX graph ({str(exc).splitlines()[0][:200]})") from exc

    def encode(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Images (B, 3, H, W) float32 in [-1, 1] -> (pixel codes, semantic codes), each (B, h, w, Q) int64."""
        images = np.asarray(images)
        expected = f"float32 images (B, 3, {self.input_size[0]}, {self.input_size[1]}) in [-1, 1]"
        if images.dtype != np.float32 or images.ndim != 4 or images.shape[1:] != (3, *self.input_size):
            raise ImageError(f"expected {expected}, got {images.dtype} {images.shape}")
        pixel, semantic = self.encoder.run(None, {"images": images})
        return pixel, semantic

    def decode(self, pixel_codes: np.ndarray) -> np.ndarray:
        """Pixel codes (B, h, w, k), 1 <= k <= the pixel depth -> images (B, 3, H, W) float32, unclamped."""
        codes = np.asarray(pixel_codes)
        depth, size = self.depths["pixel"], self.codebook_sizes["pixel"]
        expected = f"integer pixel codes (B, {self.grid[0]}, {self.grid[1]}, k), 1 <= k <= {depth}, in [0, {size})"
        if codes.dtype.kind not in "iu" or codes.ndim != 4 or codes.shape[1:3] != self.grid or not 1 <= codes.shape[3] <= depth:
            raise CodesError(f"expected {expected}, got {codes.dtype} {codes.shape}")
        if codes.size and (codes.min() < 0 or codes.max() >= size):
            raise CodesError(f"expected {expected}, got values in [{codes.min()}, {codes.max()}]")
        (images,) = self.decoder.run(None, {"pixel_codes": codes.astype(np.int64)})
        return images
