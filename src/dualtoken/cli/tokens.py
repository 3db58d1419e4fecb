"""``dualtoken encode | decode | reconstruct | info | convert-reference | demo``."""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from ..config import list_models
from ..errors import CheckpointError, DataError
from ..io import expand_inputs, load_image, save_image
from ..metrics import psnr, ssim
from ..tokenfile import load_tokens, save_tokens
from ..tokenizer import DualTokenizer
from ..visualize import side_by_side, token_figure, vstack

DEFAULT_MODEL = "dualtoken-efflite0"
FALLBACK_MODEL = "dualtoken-tiny"


def load_model(spec: str) -> DualTokenizer:
    """A model folder or embedded model name -> trained weights; an architecture name -> random weights (noted)."""
    from ..config import get_config
    from ..pretrained import pretrained_path

    if Path(spec).is_dir() or pretrained_path(spec) is not None:
        return DualTokenizer.from_pretrained(spec)
    if spec in list_models():
        print(f"note: {spec} is an architecture without trained weights: using random weights", file=sys.stderr)
        torch.manual_seed(0)
        return DualTokenizer.from_config(get_config(spec)).eval()
    raise CheckpointError(f"--model {spec!r} is neither a model folder nor one of {list_models()}")


def default_model() -> str:
    from ..pretrained import pretrained_path

    return DEFAULT_MODEL if pretrained_path(DEFAULT_MODEL) is not None else FALLBACK_MODEL


def _batches(items: list, size: int, desc: str):
    bar = tqdm(total=len(items), desc=desc, unit="img", disable=len(items) < 2, file=sys.stderr)
    for start in range(0, len(items), size):
        chunk = items[start : start + size]
        yield chunk
        bar.update(len(chunk))
    bar.close()


def cmd_encode(args: argparse.Namespace) -> int:
    tokenizer = load_model(args.model)
    out = Path(args.out)
    if out.suffix != ".safetensors":
        from ..data.tokenize import encode_dataset

        summary = encode_dataset(
            tokenizer, args.inputs[0], str(out), shard_size=args.shard_size, batch_size=args.batch_size
        )
        print(json.dumps(summary))
        return 0
    files = expand_inputs(args.inputs)
    pixel, semantic = [], []
    with torch.inference_mode():
        for chunk in _batches(files, args.batch_size, "encode"):
            tokens = tokenizer.encode(torch.stack([load_image(f, tokenizer.image_size) for f in chunk]))
            pixel.append(tokens.pixel)
            semantic.append(tokens.semantic)
    ids = [str(f) for f in files]
    sizes = (tokenizer.codebook_size("pixel"), tokenizer.codebook_size("semantic"))
    save_tokens(out, torch.cat(pixel), torch.cat(semantic), ids, tokenizer.config.name, sizes)
    print(f"wrote {out}: {len(files)} images x ({_tokens_per_image(tokenizer)}) tokens")
    return 0


def cmd_decode(args: argparse.Namespace) -> int:
    tokenizer = load_model(args.model)
    tokens = load_tokens(args.tokens)
    if tokens.model != tokenizer.config.name:
        print(f"note: tokens come from {tokens.model!r}, decoding with {tokenizer.config.name!r}", file=sys.stderr)
    _check_depth(args.depth, tokenizer.pixel_depth)
    codes = tokens.pixel if args.depth is None else tokens.pixel[..., : args.depth]
    out = Path(args.out)
    indices = list(range(codes.shape[0]))
    with torch.inference_mode():
        for chunk in _batches(indices, args.batch_size, "decode"):
            images = tokenizer.decode(codes[chunk])
            for index, image in zip(chunk, images):
                save_image(image, out / f"{index:06d}_{Path(tokens.ids[index]).stem}.png")
    print(f"wrote {len(indices)} PNGs to {out}")
    return 0


def reconstruct_files(tokenizer: DualTokenizer, files: list[Path], out: Path, depth: int | None, batch_size: int) -> list[dict]:
    """Tokenize and reconstruct files; write side-by-side PNGs and labelled token maps; return per-image metrics."""
    _check_depth(depth, tokenizer.pixel_depth)
    rows = []
    with torch.inference_mode():
        for chunk in _batches(files, batch_size, "reconstruct"):
            images = torch.stack([load_image(f, tokenizer.image_size) for f in chunk])
            tokens = tokenizer.encode(images)
            pixel = tokens.pixel if depth is None else tokens.pixel[..., :depth]
            recon = tokenizer.decode(pixel)
            scores_psnr, scores_ssim = psnr(recon, images), ssim(recon, images)
            for i, path in enumerate(chunk):
                save_image(side_by_side(images[i], recon[i]), out / f"{path.stem}_reconstruction.png")
                maps = token_figure(tokenizer, tokens.pixel[i], tokens.semantic[i])
                save_image(maps, out / f"{path.stem}_tokens.png")
                rows.append(
                    {
                        "image": str(path),
                        "psnr": round(float(scores_psnr[i]), 3),
                        "ssim": round(float(scores_ssim[i]), 4),
                        "pixel_depths": int(pixel.shape[-1]),
                    }
                )
    return rows


def _tokens_per_image(tokenizer: DualTokenizer) -> str:
    h, w = tokenizer.grid
    return f"{h}x{w} positions x ({tokenizer.pixel_depth} pixel + {tokenizer.semantic_depth} semantic codes)"


def write_metrics(tokenizer: DualTokenizer, rows: list[dict], out: Path) -> dict:
    """``metrics.json`` of ``reconstruct`` and ``demo`` (one shape): the model, its tokens per image, one row per
    image (image, psnr, ssim, pixel_depths) and the means over the images; prints the same."""
    summary = {
        "model": tokenizer.config.name,
        "tokens_per_image": _tokens_per_image(tokenizer),
        "images": rows,
        "mean": {
            metric: round(sum(r[metric] for r in rows) / len(rows), 4) if rows else None for metric in ("psnr", "ssim")
        },
    }
    (out / "metrics.json").write_text(json.dumps(summary, indent=2) + "\n")
    for row in rows:
        print(f"{row['image']}: PSNR {row['psnr']:.2f} dB  SSIM {row['ssim']:.4f}")
    if rows:
        mean = summary["mean"]
        print(f"mean over {len(rows)} images: PSNR {mean['psnr']:.2f} dB  SSIM {mean['ssim']:.4f}")
    return summary


def cmd_reconstruct(args: argparse.Namespace) -> int:
    tokenizer = load_model(args.model)
    out = Path(args.out)
    rows = reconstruct_files(tokenizer, expand_inputs(args.inputs), out, args.depth, args.batch_size)
    write_metrics(tokenizer, rows, out)
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    tokenizer = load_model(args.model)
    parts = {
        "backbone": tokenizer.backbone,
        "pixel branch": tokenizer.pixel,
        "pixel shortcut": tokenizer.pixel_shortcut,
        "semantic branch": tokenizer.semantic,
        "decoder": tokenizer.decoder,
    }
    print(tokenizer.config.to_json())
    print(f"input: {tokenizer.image_size[0]}x{tokenizer.image_size[1]} RGB in [-1, 1]")
    print(f"tokens per image: {_tokens_per_image(tokenizer)}")
    quantizers = {id(q): q for q in (tokenizer.quantizer("pixel"), tokenizer.quantizer("semantic"))}.values()
    bits = sum(q.depth * math.log2(q.codebook_size) for q in quantizers)
    h, w = tokenizer.grid
    print(f"rate: {bits * h * w / (tokenizer.image_size[0] * tokenizer.image_size[1]):.4f} bits per pixel (all vocabularies)")
    for name, module in parts.items():
        if module is not None:
            print(f"parameters, {name}: {sum(p.numel() for p in module.parameters()):,}")
    print(f"parameters, total: {sum(p.numel() for p in tokenizer.parameters()):,}")
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    from ..checkpoint import convert_reference

    tokenizer = convert_reference(args.config, args.weights, args.siglip, args.out)
    print(f"wrote {args.out} ({tokenizer.config.name}); load with DualTokenizer.from_pretrained({str(args.out)!r})")
    return 0


def demo_images() -> list[tuple[str, torch.Tensor]]:
    """Real photos that ship inside scikit-image: (name, uint8 HWC array)."""
    from skimage import data

    return [(name, getattr(data, name)()) for name in ("astronaut", "coffee", "chelsea")]


def cmd_demo(args: argparse.Namespace) -> int:
    from PIL import Image

    out = Path(args.out)
    tokenizer = load_model(args.model or default_model())
    files = [Path(p) for p in args.images] if args.images else []
    if not files:
        source = out / "inputs"
        source.mkdir(parents=True, exist_ok=True)
        for name, array in demo_images():
            Image.fromarray(array).save(source / f"{name}.png")
            files.append(source / f"{name}.png")
    files = expand_inputs(files)
    rows = reconstruct_files(tokenizer, files, out, None, 4)
    pictures = [np.asarray(Image.open(out / f"{Path(r['image']).stem}_reconstruction.png")) for r in rows]
    save_image(vstack(pictures), out / "demo.png")
    print(f"model {tokenizer.config.name}; tokens per image: {_tokens_per_image(tokenizer)}")
    write_metrics(tokenizer, rows, out)
    print(f"pictures in {out}/ (demo.png: originals left, reconstructions right; *_tokens.png: token maps by "
          "vocabulary and depth k)")
    return 0


def register(subparsers) -> None:
    def model_arg(p, default=None):
        p.add_argument("--model", default=default, help="model folder, embedded model or architecture name")

    p = subparsers.add_parser("encode", help="images or a folder -> a token file (or sharded token folder)")
    p.add_argument("inputs", nargs="+", help="image files and/or folders (or a data source for a sharded folder)")
    model_arg(p, FALLBACK_MODEL)
    p.add_argument("--out", required=True, help="FILE.safetensors, or a folder for sharded, resumable output")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--shard-size", type=int, default=10000, help="images per shard (sharded output only)")
    p.set_defaults(func=cmd_encode)

    p = subparsers.add_parser("decode", help="a token file -> PNGs from the pixel codes")
    p.add_argument("tokens", help="token file written by `dualtoken encode`")
    model_arg(p, FALLBACK_MODEL)
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--depth", type=int, default=None, help="decode only the first k residual depths")
    p.add_argument("--batch-size", type=int, default=16)
    p.set_defaults(func=cmd_decode)

    p = subparsers.add_parser("reconstruct", help="images -> side-by-side PNGs, token maps and PSNR/SSIM")
    p.add_argument("inputs", nargs="+")
    model_arg(p, FALLBACK_MODEL)
    p.add_argument("--out", required=True)
    p.add_argument("--depth", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=8)
    p.set_defaults(func=cmd_reconstruct)

    p = subparsers.add_parser("info", help="config, parameter counts, tokens per image")
    model_arg(p, FALLBACK_MODEL)
    p.set_defaults(func=cmd_info)

    p = subparsers.add_parser("convert-reference", help="import a checkpoint of the authors' release")
    p.add_argument("--config", required=True, help="release config.json (with an rqvaesiglip block)")
    p.add_argument("--weights", required=True, help=".safetensors or torch checkpoint with a state_dict")
    p.add_argument("--siglip", required=True, help="the SigLIP folder (save_pretrained format) it was built on")
    p.add_argument("--out", required=True, help="output model folder")
    p.set_defaults(func=cmd_convert)

    p = subparsers.add_parser("demo", help="tokenize and reconstruct real photos with the default model")
    p.add_argument("images", nargs="*", help="your own images or folders (default: photos shipped in scikit-image)")
    model_arg(p)
    p.add_argument("--out", default="demo_out")
    p.set_defaults(func=cmd_demo)


def _check_depth(value: int | None, depth: int) -> None:
    if value is not None and not 1 <= value <= depth:
        raise DataError(f"--depth must be in 1..{depth}, got {value}")
