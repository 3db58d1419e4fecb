"""Ship a trained EfficientNet-Lite0 DualToken as the embedded default: at the 256 px evaluation size (the CPU
recipe trains on 128 px crops with the same weights), renamed, in float16 (half the file).

usage: python recipes/efflite0/ship.py EXPORT_DIR [--out src/dualtoken/pretrained/dualtoken-efflite0]
       [--image-size 256] [--name dualtoken-efflite0] [--metrics recipes/efflite0/model_card/dualtoken-efflite0.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import torch

from dualtoken import DualTokenizer

DEFAULT_OUT = "src/dualtoken/pretrained/dualtoken-efflite0"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("export", help="a folder written by save_pretrained (the trainer's final export)")
    parser.add_argument("--out", default=DEFAULT_OUT)
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--name", default="dualtoken-efflite0")
    parser.add_argument(
        "--metrics", default=None, help="a JSON file of the figures the model ships with (written into its model card)"
    )
    args = parser.parse_args(argv)
    tokenizer = DualTokenizer.from_pretrained(args.export).at_resolution(args.image_size)
    tokenizer.config = dataclasses.replace(tokenizer.config, name=args.name)
    metrics = json.loads(Path(args.metrics).read_text()) if args.metrics else None
    path = tokenizer.save_pretrained(args.out, dtype=torch.float16, metrics=metrics) / "model.safetensors"
    print(json.dumps({"out": args.out, "megabytes": round(path.stat().st_size / 2**20, 1)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
