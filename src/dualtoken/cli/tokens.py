"""``dualtoken encode | decode | reconstruct | info | convert-reference | demo``."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from ..errors import DataError
from ..io import BackgroundSaver, sample_photos, save_image, to_uint8
from ..metrics import psnr, ssim
from ..registry import is_model, list_models, model_entry
from ..tokenfile import TokenFile, iter_token_files, load_tokens, save_tokens
from ..tokenizer import DualTokenizer
from ..visualize import side_by_side, token_figure, vstack
from .options import (
    COUNT,
    IMAGE_NOTE,
    add_model_options,
    add_precision_option,
    add_strict_option,
    announce_precision,
    expand_inputs,
    image_batches,
    load_model,
    plural,
    require_some,
    use_precision,
)

INPUT_LIST = "inputs.txt"  # encode --out FOLDER with several inputs: the list of their images, kept for resuming


def _progress(total: int, desc: str) -> tqdm:
    return tqdm(total=total, desc=desc, unit="img", disable=total < 2, file=sys.stderr)


def cmd_encode(args: argparse.Namespace) -> int:
    use_precision(args, announce=False)
    to_folder = _is_folder_output(args.out)
    tokenizer = load_model(args.model, args.random_weights)
    out = Path(args.out)
    if to_folder:
        return _encode_to_folder(tokenizer, args.inputs, out, args)
    files = expand_inputs(args.inputs)
    pixel, semantic, ids = [], [], []
    bar = _progress(len(files), "encode")
    with torch.inference_mode():
        batches = image_batches(files, tokenizer.image_size, args.batch_size, skip=len(args.inputs) > 1)
        for paths, images in batches:
            tokens = tokenizer.encode(images)
            pixel.append(tokens.pixel)
            semantic.append(tokens.semantic)
            ids += [str(p) for p in paths]
            bar.update(len(paths))
    bar.close()
    require_some(len(ids), args.inputs)
    sizes = (tokenizer.codebook_size("pixel"), tokenizer.codebook_size("semantic"))
    save_tokens(
        out, torch.cat(pixel), torch.cat(semantic), ids, tokenizer.config.name, sizes, tokenizer.name_or_path
    )
    print(f"wrote {out}: {plural(len(ids), 'image')} x ({_tokens_per_image(tokenizer)}) tokens")
    return 0


def _is_folder_output(out: str) -> bool:
    """``encode --out``: a token file (``*.safetensors``) or a token folder (an existing folder, or a path ending in
    ``/``); any other path is a DataError naming both forms, before anything is loaded or written."""
    if out.endswith(("/", os.sep)):
        return True
    if Path(out).suffix == ".safetensors":
        return False
    if Path(out).is_dir():
        return True
    raise DataError(
        f"--out {out}: expected FILE.safetensors (one token file) or a folder for sharded output (an existing "
        f"folder, or a path ending in /: --out {out}/)"
    )


def _encode_to_folder(tokenizer: DualTokenizer, inputs: list[str], out: Path, args: argparse.Namespace) -> int:
    """Sharded, resumable output. One input is a data source as it is (folder, file list, WebDataset shards);
    several are expanded to their images and listed in ``out/inputs.txt``, the source then encoded."""
    from ..data.tokenize import encode_dataset

    source = inputs[0]
    if len(inputs) > 1:
        files = expand_inputs(inputs)
        require_some(len(files), inputs)
        out.mkdir(parents=True, exist_ok=True)
        source = str(out / INPUT_LIST)
        Path(source).write_text("".join(f"{f.resolve()}\n" for f in files))
    announce_precision()
    summary = encode_dataset(
        tokenizer, source, str(out), shard_size=args.shard_size, batch_size=args.batch_size, progress=False
    )
    if summary["units_reused"] == 0:
        require_some(summary["images"], inputs)
    reused = f", {summary['units_reused']} of them already there" if summary["units_reused"] else ""
    print(f"wrote {summary['out_dir']}: {plural(summary['images'], 'image')} in "
          f"{plural(summary['units'], 'token file')}{reused}; {summary['skipped']} skipped")
    return 0


def _token_sets(path: Path) -> list[TokenFile]:
    """A token file, or every token file of a folder written by ``encode --out FOLDER``."""
    if path.is_dir():
        sets = list(iter_token_files(path))
        if not sets:
            raise DataError(f"no token files (*.safetensors) in {path}")
        return sets
    return [load_tokens(path)]


def _recorded_model(tokens: TokenFile, where: Path) -> str:
    """What the token file's model was loaded from (a trained name, a folder, a Hub id), for the resolver. A file
    without it was written by a model built in memory (random weights): the user names the model."""
    if tokens.source is not None:
        return tokens.source
    hint = f"--model {tokens.model} --random-weights" if is_model(tokens.model) else "--model"
    raise DataError(f"{where} does not record where its model {tokens.model!r} came from (random weights?): pass {hint}")


def cmd_decode(args: argparse.Namespace) -> int:
    use_precision(args, announce=False)
    path = Path(args.tokens)
    sets = _token_sets(path)
    tokenizer = load_model(args.model or _recorded_model(sets[0], path), args.random_weights)
    _check_depth(args.depth, tokenizer.pixel_depth)
    out = Path(args.out)
    total = sum(len(t.ids) for t in sets)
    bar, index = _progress(total, "decode"), 0
    announce_precision()
    with torch.inference_mode(), BackgroundSaver() as saver:  # PNGs written while the next batch decodes
        for tokens in sets:
            codes = tokens.pixel if args.depth is None else tokens.pixel[..., : args.depth]
            for start in range(0, codes.shape[0], args.batch_size):
                images = to_uint8(tokenizer.decode(codes[start : start + args.batch_size]))  # (B, H, W, 3)
                for offset, image in enumerate(images):
                    name = Path(tokens.ids[start + offset]).stem
                    saver.save(image, out / f"{index:06d}_{name}.png")
                    index += 1
                    bar.update(1)
    bar.close()
    print(f"wrote {plural(index, 'PNG')} to {out}")
    return 0


def reconstruct_files(
    tokenizer: DualTokenizer, files: list[Path], out: Path, depth: int | None, batch_size: int, skip: bool = True
) -> list[dict]:
    """Tokenize and reconstruct the readable files; write side-by-side PNGs and labelled token maps; per-image
    metrics. ``skip``: see :func:`~dualtoken.cli.options.image_batches`."""
    _check_depth(depth, tokenizer.pixel_depth)
    rows = []
    bar = _progress(len(files), "reconstruct")
    with torch.inference_mode(), BackgroundSaver() as saver:  # PNGs written while the next batch runs
        for paths, images in image_batches(files, tokenizer.image_size, batch_size, skip):
            tokens = tokenizer.encode(images)
            pixel = tokens.pixel if depth is None else tokens.pixel[..., :depth]
            recon = tokenizer.decode(pixel)
            scores_psnr, scores_ssim = psnr(recon, images), ssim(recon, images)
            for i, path in enumerate(paths):
                saver.save(side_by_side(images[i], recon[i]), out / f"{path.stem}_reconstruction.png")
                saver.save(token_figure(tokenizer, tokens.pixel[i], tokens.semantic[i]), out / f"{path.stem}_tokens.png")
                rows.append(
                    {
                        "image": str(path),
                        "psnr": round(float(scores_psnr[i]), 3),
                        "ssim": round(float(scores_ssim[i]), 4),
                        "pixel_depths": int(pixel.shape[-1]),
                    }
                )
            bar.update(len(paths))
    bar.close()
    return rows


def _tokens_per_image(tokenizer: DualTokenizer) -> str:
    h, w = tokenizer.grid
    return f"{h}x{w} positions x ({tokenizer.pixel_depth} pixel + {tokenizer.semantic_depth} semantic codes)"


def write_metrics(tokenizer: DualTokenizer, rows: list[dict], out: Path) -> dict:
    """``metrics.json`` of ``reconstruct`` and ``demo`` (one shape): the model and what it was fine-tuned from, its
    tokens per image, one row per image (image, psnr, ssim, pixel_depths) and the means over the images; prints the
    same."""
    summary = {
        "model": tokenizer.config.name,
        "base_model": tokenizer.config.base_model,  # what a fine-tuned model started from; null otherwise
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
        print(f"mean over {plural(len(rows), 'image')}: PSNR {mean['psnr']:.2f} dB  SSIM {mean['ssim']:.4f}")
    return summary


def cmd_reconstruct(args: argparse.Namespace) -> int:
    use_precision(args, announce=False)
    tokenizer = load_model(args.model, args.random_weights)
    out = Path(args.out)
    rows = reconstruct_files(
        tokenizer, expand_inputs(args.inputs), out, args.depth, args.batch_size, skip=len(args.inputs) > 1
    )
    require_some(len(rows), args.inputs)
    write_metrics(tokenizer, rows, out)
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    if args.list:
        for name in list_models():
            print(f"{name}\t{model_entry(name).kind}")
        return 0
    tokenizer = load_model(args.model, args.random_weights)
    if args.json:
        print(tokenizer.config.to_json())
        return 0
    parts = {
        "backbone": tokenizer.backbone,
        "pixel branch": tokenizer.pixel,
        "pixel shortcut": tokenizer.pixel_shortcut,
        "semantic branch": tokenizer.semantic,
        "decoder": tokenizer.decoder,
    }
    base = tokenizer.config.base_model
    print(f"model: {tokenizer.config.name}" + (f" (fine-tuned from {base})" if base else ""))
    print(f"input: {tokenizer.image_size[0]}x{tokenizer.image_size[1]} RGB in [-1, 1]")
    print(f"tokens per image: {_tokens_per_image(tokenizer)}")
    rate = tokenizer.bits_per_pixel()
    print(f"rate: {rate['pixel']:.4f} (pixel) + {rate['semantic']:.4f} (semantic) bits per pixel; "
          f"{rate['total']:.4f} in all")
    for name, module in parts.items():
        if module is not None:
            print(f"parameters, {name}: {sum(p.numel() for p in module.parameters()):,}")
    print(f"parameters, total: {sum(p.numel() for p in tokenizer.parameters()):,}")
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    from ..reference import convert_reference

    tokenizer = convert_reference(args.config, args.weights, args.siglip, args.out)
    print(f"wrote {args.out} ({tokenizer.config.name}); load with DualTokenizer.from_pretrained({str(args.out)!r})")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    use_precision(args, announce=False)
    from PIL import Image

    out = Path(args.out)
    tokenizer = load_model(args.model, args.random_weights)
    inputs = list(args.images)
    if not inputs:
        source = out / "inputs"
        source.mkdir(parents=True, exist_ok=True)
        for name, array in sample_photos():
            Image.fromarray(array).save(source / f"{name}.png")
            inputs.append(str(source / f"{name}.png"))
    rows = reconstruct_files(tokenizer, expand_inputs(inputs), out, None, 4, skip=len(inputs) > 1)
    require_some(len(rows), inputs)
    pictures = [np.asarray(Image.open(out / f"{Path(r['image']).stem}_reconstruction.png")) for r in rows]
    save_image(vstack(pictures), out / "demo.png")
    print(f"model {tokenizer.config.name}; tokens per image: {_tokens_per_image(tokenizer)}")
    write_metrics(tokenizer, rows, out)
    print(f"pictures in {out}/ (demo.png: originals left, reconstructions right; *_tokens.png: token maps by "
          "vocabulary and depth k)")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("encode", help="images or folders -> a token file, or a sharded token folder", epilog=IMAGE_NOTE)
    p.add_argument("inputs", nargs="+", help="image files and/or folders (one input may also be a file list or "
                   "WebDataset shards when --out is a folder)")
    p.add_argument("--out", required=True, help="FILE.safetensors (one token file), or a folder for sharded, "
                   "resumable output: an existing folder or a path ending in / (FOLDER/)")
    add_model_options(p)
    p.add_argument("--batch-size", type=COUNT, default=16, help="images per forward pass")
    p.add_argument("--shard-size", type=COUNT, default=10000, help="images per token file (folder output only)")
    add_strict_option(p)
    add_precision_option(p)
    p.set_defaults(func=cmd_encode)

    p = subparsers.add_parser("decode", help="a token file or folder -> PNGs from the pixel codes")
    p.add_argument("tokens", help="a token file or a sharded token folder written by `dualtoken encode`")
    p.add_argument("--out", required=True, help="output folder")
    add_model_options(p, default=None, note=" (default: the model recorded in the token file)")
    p.add_argument("--depth", type=COUNT, default=None, help="decode only the first k residual depths (default: all)")
    p.add_argument("--batch-size", type=COUNT, default=16, help="images per forward pass")
    add_precision_option(p)
    p.set_defaults(func=cmd_decode)

    p = subparsers.add_parser("reconstruct", help="images -> side-by-side PNGs, token maps and PSNR/SSIM", epilog=IMAGE_NOTE)
    p.add_argument("inputs", nargs="+", help="image files and/or folders")
    p.add_argument("--out", required=True, help="output folder")
    add_model_options(p)
    p.add_argument("--depth", type=COUNT, default=None, help="decode only the first k residual depths (default: all)")
    p.add_argument("--batch-size", type=COUNT, default=8, help="images per forward pass")
    add_strict_option(p)
    add_precision_option(p)
    p.set_defaults(func=cmd_reconstruct)

    p = subparsers.add_parser(
        "info", help="a model's tokens per image, rate and parameter counts; --json: its config; --list: the names"
    )
    add_model_options(p)
    p.add_argument("--json", action="store_true", help="print the model's whole config (JSON) instead of the summary")
    p.add_argument("--list", action="store_true", help="list the registered names and which have trained weights")
    p.set_defaults(func=cmd_info)

    p = subparsers.add_parser("convert-reference", help="import a checkpoint of the authors' release")
    p.add_argument("--config", required=True, help="release config.json (with an rqvaesiglip block)")
    p.add_argument("--weights", required=True, help=".safetensors or torch checkpoint with a state_dict")
    p.add_argument("--siglip", required=True, help="the SigLIP folder (save_pretrained format) it was built on")
    p.add_argument("--out", required=True, help="output model folder")
    p.set_defaults(func=cmd_convert)

    p = subparsers.add_parser("demo", help="tokenize and reconstruct real photos with the default model", epilog=IMAGE_NOTE)
    p.add_argument("images", nargs="*", help="your own images or folders (default: photos shipped in scikit-image)")
    add_model_options(p)
    p.add_argument("--out", default="demo_out", help="output folder")
    add_strict_option(p)
    add_precision_option(p)
    p.set_defaults(func=cmd_demo)


def _check_depth(value: int | None, depth: int) -> None:
    if value is not None and not 1 <= value <= depth:
        raise DataError(f"--depth must be in 1..{depth}, got {value}")
