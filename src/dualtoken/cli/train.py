"""``dualtoken train --config FILE [--set key=value ...]``: train or fine-tune a tokenizer (resumes by itself).

Run it as is for one process, or under ``torchrun --nproc_per_node N -m dualtoken train ...`` for DDP / FSDP2.
"""

from __future__ import annotations

import argparse
import json

from .options import COUNT


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
