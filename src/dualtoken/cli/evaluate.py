"""``dualtoken eval``: evaluate a tokenizer on a folder, file list or WebDataset shards; write report.json,
report.md and PNG figures. Runs under torchrun as it is (each process takes its share of the images)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..config import apply_overrides, load_config_file
from ..data.images import warn_skipped
from ..errors import DataError
from ..evaluation import METRIC_GROUPS, EvalConfig
from ..evaluation.distributed import rank_and_world
from ..process_group import join_process_group
from ..tokenizer import DualTokenizer
from .options import (
    COUNT,
    MODEL_HELP,
    ZERO_OR_MORE,
    add_precision_option,
    add_strict_option,
    announce_precision,
    use_precision,
)

# command-line flags that map one-to-one onto EvalConfig fields
FLAG_FIELDS = ("batch_size", "limit", "classes", "labels", "inception_weights", "lpips_weights", "lpips_net",
               "classifier_cache", "num_workers", "seed")


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "eval",
        help="evaluate a tokenizer: reconstruction, perceptual, distribution, semantic, codebooks, stability",
        description="Evaluate a tokenizer and write report.json, report.md, per_image.csv and PNG figures into --out. "
        "Standard rFID / LPIPS run only with local weight files; otherwise EfficientNet-Lite0 substitutes "
        "are reported under their own names.",
    )
    parser.add_argument("--model", required=True, help=MODEL_HELP)
    parser.add_argument("--data", required=True, help="image folder, file list, or WebDataset shards")
    parser.add_argument("--out", required=True, help="output folder for report.json, report.md, per_image.csv and figures")
    parser.add_argument("--metrics", nargs="+", choices=METRIC_GROUPS, help="metric groups (default: all)")
    parser.add_argument("--config", help="EvalConfig JSON file")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override an EvalConfig field, e.g. --set kid_subsets=50 (repeatable)")
    parser.add_argument("--batch-size", type=COUNT, help="images per forward pass (default: the EvalConfig default, 16)")
    parser.add_argument("--limit", type=COUNT, help="evaluate only the first N images")
    parser.add_argument("--classes", help="class names: classes.tsv (index, wnid, name) or one name per line")
    parser.add_argument("--labels", help="labels.tsv (file, class_index) for folders and file lists")
    parser.add_argument("--inception-weights", help="torch-fidelity Inception weights file: enables the real rFID")
    parser.add_argument("--lpips-weights", help="torchvision vgg16 / alexnet weights file: enables LPIPS")
    parser.add_argument("--lpips-net", choices=("vgg", "alex"), help="the LPIPS network of --lpips-weights")
    parser.add_argument("--classifier-cache", help="folder caching zero-shot text classifiers")
    parser.add_argument("--num-workers", type=ZERO_OR_MORE, help="image-decoding worker processes")
    parser.add_argument("--seed", type=ZERO_OR_MORE, help="seed of KID's random subsets")
    parser.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_strict_option(parser)
    add_precision_option(parser)
    parser.set_defaults(func=run)


def build_config(args: argparse.Namespace) -> EvalConfig:
    """EvalConfig defaults <- --config file <- flags <- --set overrides."""
    config = EvalConfig()
    if args.config:
        config = load_config_file(EvalConfig, args.config, "eval config file")
    overrides = [f"{name}={json.dumps(getattr(args, name))}" for name in FLAG_FIELDS if getattr(args, name) is not None]
    if args.metrics:
        overrides.append(f"metrics={json.dumps(args.metrics)}")
    return apply_overrides(config, overrides + list(args.overrides))


def run(args: argparse.Namespace) -> int:
    use_precision(args, announce=False)
    config = build_config(args)
    joined = join_process_group()
    rank = rank_and_world()[0]
    from ..evaluation.api import evaluate  # the metric libraries load only when eval runs

    try:
        model = DualTokenizer.from_pretrained(args.model)  # a model that cannot load fails here, before the note
        if rank == 0:
            announce_precision()
        report = evaluate(model, args.data, args.out, config, device=args.device, progress=not args.no_progress)
    finally:
        if joined:
            import torch.distributed as dist

            dist.destroy_process_group()
    if rank == 0:
        for item in report["data"]["skipped_images"]:
            warn_skipped(item["id"], item["reason"])
        if report["data"]["num_images"] == 0:
            raise DataError(f"no readable image in {args.data}")
        metrics = report["metrics"]
        shown = ", ".join(f"{k} {v:.4g}" for k, v in metrics.items() if k in ("psnr", "ssim", "fd_efficientnet_lite0",
                                                                                "rfid", "zeroshot_top1", "head_top1"))
        print(f"evaluated {report['data']['num_images']} images: {shown}")
        print(f"report: {Path(args.out) / 'report.md'}")
    return 0
