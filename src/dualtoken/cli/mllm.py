"""``dualtoken chat | generate | train-mllm``: the unified MLLM from the command line."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from ..config import apply_overrides
from ..errors import DataError
from ..io import load_image, save_image
from ..registry import DEFAULT_MLLM
from .options import COUNT, ZERO_OR_MORE, add_precision_option, use_precision


def _load(name_or_path: str, device: str):
    from ..mllm import DualTokenMLLM

    model = DualTokenMLLM.from_pretrained(name_or_path)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return model.to(device)


def cmd_chat(args: argparse.Namespace) -> int:
    model = _load(args.model, args.device)
    height, width = model.visual_tokenizer.image_size
    if args.image is None and not args.no_image:
        raise DataError(
            f"no --image: this MLLM answers about an image ({height}x{width} px; any image file is resized and "
            "centre-cropped to it); pass --image FILE, or --no-image to ask the language model alone"
        )
    image = load_image(args.image, (height, width)) if args.image else None
    use_precision(args)
    options = {"max_new_tokens": args.max_new_tokens, "temperature": args.temperature, "seed": args.seed}
    print(model.chat(image, args.question, **options))
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from ..mllm import generate_images

    if not args.prompt.strip():
        raise DataError('empty prompt: say what to draw, e.g. "Draw a horse."')
    model = _load(args.model, args.device)
    use_precision(args)
    out = Path(args.out)
    prompts = [args.prompt] * args.num
    result = generate_images(
        model,
        prompts,
        cfg_scale=args.cfg,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
    )
    paths = (
        [out] if args.num == 1 else [out.with_name(f"{out.stem}_{i}{out.suffix}") for i in range(args.num)]
    )
    for image, path in zip(result.images, paths):
        save_image(image.clamp(-1, 1), path)
        print(f"wrote {path}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from ..mllm.config import MLLMTrainConfig, load_config
    from ..mllm.train import train_mllm

    config = apply_overrides(load_config(MLLMTrainConfig, args.config), args.set)
    summary = train_mllm(config, Path(args.config).parent, progress=not args.quiet, stop_at=args.stop_at)
    print(f"model: {summary['export']}" if summary["export"] else "stopped; run the same command again to resume")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("chat", help="answer a question about an image with an MLLM")
    p.add_argument("question", help="the question, in plain text")
    p.add_argument(
        "--model", default=DEFAULT_MLLM,
        help=f"an embedded MLLM's name or a folder written by save_pretrained / train-mllm (default: {DEFAULT_MLLM})",
    )
    p.add_argument(
        "--image", default=None,
        help="image file (any PIL-readable format), resized and centre-cropped to the MLLM's input size",
    )
    p.add_argument("--no-image", action="store_true", help="ask without an image (the language model alone)")
    p.add_argument("--max-new-tokens", type=COUNT, default=None, help="answer length limit (default: the model's default)")
    p.add_argument("--temperature", type=float, default=None, help="0 = greedy (default: the model's, greedy)")
    p.add_argument("--seed", type=ZERO_OR_MORE, default=0, help="sampling seed")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 ... (default: auto, cuda when available)")
    add_precision_option(p)
    p.set_defaults(func=cmd_chat)

    p = subparsers.add_parser("generate", help="draw an image from a text prompt with an MLLM")
    p.add_argument("prompt", help="what to draw, in plain text")
    p.add_argument(
        "--model", default=DEFAULT_MLLM,
        help=f"an embedded MLLM's name or a folder written by save_pretrained / train-mllm (default: {DEFAULT_MLLM})",
    )
    p.add_argument("--out", required=True, help="output PNG (with --num N: OUT_0.png ... OUT_{N-1}.png)")
    p.add_argument(
        "--cfg", type=float, default=None,
        help="classifier-free guidance scale; 1 = off (default: the model's sampling.cfg_scale, its best measured "
        f"scale; 3 for {DEFAULT_MLLM})",
    )
    p.add_argument("--num", type=COUNT, default=1, help="images to draw for the prompt")
    p.add_argument("--temperature", type=float, default=None, help="sampling temperature (default: the model's default)")
    p.add_argument("--top-k", type=ZERO_OR_MORE, default=None, help="top-k sampling, 0 = off (default: the model's default)")
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling, 1 = off (default: the model's default)")
    p.add_argument("--seed", type=ZERO_OR_MORE, default=0, help="sampling seed")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 ... (default: auto, cuda when available)")
    add_precision_option(p)
    p.set_defaults(func=cmd_generate)

    p = subparsers.add_parser("train-mllm", help="train or fine-tune an MLLM (resumes from its output_dir)")
    p.add_argument("--config", required=True, help="MLLMTrainConfig JSON (relative paths: from its folder)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config value")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument(
        "--stop-at", type=COUNT, default=None, metavar="STEP", help="stop (resumably) at this step, as `train` does"
    )
    p.set_defaults(func=cmd_train)
