"""``dualtoken export onnx MODEL OUT_DIR``: a tokenizer as ONNX graphs that run without PyTorch."""

from __future__ import annotations

import argparse
import io
from pathlib import Path

import torch

from ..backend import onnxruntime_available
from ..errors import ConfigError, DataError
from ..export import ExportedTokenizer, export_onnx
from ..io import load_image, png_bytes, sample_photos
from .options import MODEL_HELP, load_model


def cmd_export(args: argparse.Namespace) -> int:
    if not onnxruntime_available():
        raise ConfigError("export onnx needs onnx and onnxruntime: pip install 'onnxruntime>=1.20,<1.33' 'onnx>=1.17,<1.24'")
    out = Path(args.out_dir)
    if out.exists() and not out.is_dir():
        raise DataError(f"{out} is a file; expected a folder (new or existing) for encoder.onnx, decoder.onnx, manifest.json")
    tokenizer = load_model(args.model, args.random_weights)
    export_onnx(tokenizer, out)
    sizes = ", ".join(f"{name} ({(out / name).stat().st_size / 2**20:.1f} MiB)" for name in ("encoder.onnx", "decoder.onnx"))
    print(f"wrote {out}/: {sizes}, manifest.json")
    # read it back the way a deployment does, and compare with the PyTorch path on the demo photos
    exported = ExportedTokenizer(out)
    images = torch.stack([load_image(io.BytesIO(png_bytes(array)), tokenizer.image_size) for _, array in sample_photos()])
    with torch.inference_mode():
        reference = tokenizer.encode(images, precision="fp32", backend="torch")
        decoded = tokenizer.decode(reference.pixel, precision="fp32", backend="torch")
    pixel, semantic = exported.encode(images.numpy())
    agree = [float((torch.from_numpy(c) == r).float().mean()) for c, r in ((pixel, reference.pixel),
                                                                            (semantic, reference.semantic))]
    gap = float((torch.from_numpy(exported.decode(reference.pixel.numpy())) - decoded).abs().max())
    print(f"checked in ONNX Runtime on {len(images)} demo photos: codes equal to PyTorch's: pixel {agree[0]:.2%}, "
          f"semantic {agree[1]:.2%}; decoded images within {gap:.1e} of PyTorch's")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "export", help="a tokenizer as ONNX graphs (image -> codes, pixel codes -> image) for ONNX Runtime",
        description="Write encoder.onnx (images (B, 3, H, W) in [-1, 1] -> pixel and semantic codes (B, h, w, Q)), "
        "decoder.onnx (pixel codes of any first k depths -> images) and manifest.json, then check them in ONNX "
        "Runtime against the PyTorch path.",
    )
    p.add_argument("format", choices=["onnx"], help="the export format")
    p.add_argument("model", help=MODEL_HELP)
    p.add_argument("out_dir", help="the folder to write (created if needed)")
    p.add_argument("--random-weights", action="store_true",
                   help="build MODEL as an architecture with random, seeded weights (for trying the pipeline)")
    p.set_defaults(func=cmd_export)
