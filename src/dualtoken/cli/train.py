"""``dualtoken train --config FILE [--set key=value ...]``: train or fine-tune a tokenizer (resumes by itself), and
``dualtoken finetune PHOTOS --minutes M --out DIR``: adapt a trained model's pixel path to a folder of photos in the
minutes given.

Run ``train`` as is for one process, or under ``torchrun --nproc_per_node N -m dualtoken train ...`` for DDP / FSDP2.
"""

from __future__ import annotations

import argparse
import json
import sys

from tqdm import tqdm

from ..registry import DEFAULT_MODEL
from .options import COUNT, MODEL_HELP


def cmd_train(args: argparse.Namespace) -> int:
    from ..training import load_train_config, train

    config = load_train_config(args.config, args.set)
    if args.print_config:
        print(config.to_json())
        return 0
    summary = train(config, stop_at=args.stop_at)
    if summary["export"] is not None or args.stop_at is not None:
        print(json.dumps({k: summary[k] for k in ("step", "export", "checkpoint")}))
    return 0


def cmd_finetune(args: argparse.Namespace) -> int:
    from ..training.finetune import finetune, load_finetune_config

    overrides = list(args.set)
    if args.no_progress:
        overrides.append("train.log.progress=false")
    config = load_finetune_config(overrides, minutes=args.minutes)
    result = finetune(
        args.photos, args.out, config, eval_folder=args.eval, model=args.model,
        say=lambda line: tqdm.write(line, file=sys.stderr),
    )
    for line in result.summary_lines():
        print(line)
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "train",
        help="train or fine-tune a tokenizer from a recipe (resumes from output_dir/checkpoints)",
        description="Train a DualToken tokenizer. Recipes live in recipes/; every config key can be overridden "
        "with --set, e.g. --set max_steps=100 --set data.batch_size=8 --set freeze.preset=finetune.",
    )
    p.add_argument("--config", help="a training recipe (JSON); the defaults when omitted")
    p.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key (repeatable)"
    )
    p.add_argument("--stop-at", type=COUNT, default=None, metavar="STEP", help="stop (resumably) at this step")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.set_defaults(func=cmd_train)

    f = subparsers.add_parser(
        "finetune",
        help="adapt a trained model's pixel path and decoder to a folder of photos in a few minutes (CPU)",
        description="Fine-tune the pixel vocabulary and decoder of a trained model on PHOTOS within --minutes "
        "(everything included), on 128 px crops with the tower run once per crop; the tower and the semantic "
        "vocabulary stay as they are. Prints the held-out PSNR before and after, with a 95 %% paired bootstrap "
        "interval over the held-out images (a share of PHOTOS, or --eval), and exports a model that loads by path "
        "(DualTokenizer.from_pretrained(DIR)). DIR is written atomically every few minutes: Ctrl-C keeps the last "
        "whole export. docs/TRAINING.md, 'Fine-tuning on your photos'.",
    )
    f.add_argument("photos", help="a folder of images (searched recursively)")
    f.add_argument("--out", required=True, metavar="DIR", help="the model folder to write (new, or a model folder)")
    f.add_argument("--minutes", type=float, default=10.0, help="the wall-clock budget, evaluations included")
    f.add_argument("--eval", metavar="FOLDER", help="held-out images (default: a fifth of PHOTOS, 5 to 100 images)")
    f.add_argument("--model", default=DEFAULT_MODEL, help="the model to start from: " + MODEL_HELP)
    f.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE",
        help="override a FinetuneConfig key, e.g. --set train.optimizer.lr=3e-4 or --set heldout_share=0.1",
    )
    f.add_argument("--no-progress", action="store_true", help="no progress bars")
    f.set_defaults(func=cmd_finetune)
