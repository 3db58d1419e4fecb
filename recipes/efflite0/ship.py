"""Ship a trained EfficientNet-Lite0 DualToken as the embedded default: at the 256 px evaluation size (the CPU
recipe trains on 128 px crops with the same weights), renamed, in float16 (half the file).

usage: python recipes/efflite0/ship.py EXPORT_DIR [--out src/dualtoken/pretrained/dualtoken-efflite0]
       [--image-size 256] [--name dualtoken-efflite0] [--metrics recipes/efflite0/model_card/dualtoken-efflite0.json]
       [--parts-from OTHER_EXPORT --parts backbone semantic]

``--parts-from`` joins two runs that trained different parts (the pixel vocabulary in one, the semantic one in the
other): the named parts' weights come from the other export, which must have the same shapes there.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import torch

from dualtoken import DualTokenizer
from dualtoken.errors import ConfigError
from dualtoken.factory import PART_PREFIXES, init_parts_from

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
    parser.add_argument("--parts-from", default=None, help="an export to take --parts from")
    parser.add_argument(
        "--parts", nargs="+", choices=sorted(PART_PREFIXES), default=["backbone", "semantic"],
        help="the parts taken from --parts-from (default: %(default)s)",
    )
    args = parser.parse_args(argv)
    tokenizer = DualTokenizer.from_pretrained(args.export)
    if args.parts_from:
        try:
            init_parts_from(tokenizer, DualTokenizer.from_pretrained(args.parts_from), args.parts)
        except ConfigError as exc:
            raise SystemExit(f"--parts-from {args.parts_from}: {exc}") from None
    tokenizer = tokenizer.at_resolution(args.image_size)
    tokenizer.config = dataclasses.replace(tokenizer.config, name=args.name)
    metrics = json.loads(Path(args.metrics).read_text()) if args.metrics else None
    path = tokenizer.save_pretrained(args.out, dtype=torch.float16, metrics=metrics) / "model.safetensors"
    print(json.dumps({"out": args.out, "megabytes": round(path.stat().st_size / 2**20, 1)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
