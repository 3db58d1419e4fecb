"""Turn a trained recipe MLLM (``<work>/runs/both/final``) into the embedded model ``dualtoken-mllm-cifar10``.

    python recipes/mllm_cifar/ship.py runs/mllm_cifar_prefix/runs/both/final \\
        src/dualtoken/pretrained/dualtoken-mllm-cifar10 --cfg-scale 5

Writes the MLLM's weights and the language model in float16 (the LLM is loaded back in its config's dtype), the
text tokenizer, a config that names the embedded tokenizer at the recipe's input size instead of the run's resized
copy (checked to hold the same weights), and the manifest of SHA-256 sums the loader checks. The model card
(README.md) is kept when the folder already has one.
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from dualtoken import DualTokenizer
from dualtoken.mllm.config import MLLMConfig, load_config, save_config
from dualtoken.registry import MLLM_CONFIG_NAME, MLLM_WEIGHTS_NAME, write_manifest

LLM_FILES = ("config.json", "generation_config.json")


def half(path: Path, out: Path) -> None:
    state = load_file(str(path))
    save_file({k: v.half() if v.is_floating_point() else v for k, v in state.items()}, str(out))


def check_same_tokenizer(run: Path, name: str, size: int) -> None:
    """The run's tokenizer copy must be ``name`` at ``size`` px, weight for weight."""
    copy = DualTokenizer.from_pretrained(run / "tokenizer").state_dict()
    embedded = DualTokenizer.from_pretrained(name).at_resolution(size).state_dict()
    differ = [k for k in copy if k not in embedded or not torch.equal(copy[k], embedded[k])]
    if differ or set(embedded) - set(copy):
        sys.exit(f"{run / 'tokenizer'} is not {name} at {size} px (e.g. {differ[:3]})")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="the trained MLLM folder (save_pretrained)")
    parser.add_argument("out", type=Path, help="the embedded model's folder")
    parser.add_argument("--tokenizer", default="dualtoken-efflite0", help="the embedded tokenizer it was trained with")
    parser.add_argument("--cfg-scale", type=float, help="the default guidance scale of generate (the evaluation's best)")
    args = parser.parse_args(argv)

    config = load_config(MLLMConfig, args.run / MLLM_CONFIG_NAME)
    size = DualTokenizer.from_pretrained(args.run / "tokenizer").image_size[0]
    check_same_tokenizer(args.run, args.tokenizer, size)
    out = args.out
    (out / "llm").mkdir(parents=True, exist_ok=True)
    half(args.run / MLLM_WEIGHTS_NAME, out / MLLM_WEIGHTS_NAME)
    half(args.run / "llm" / "model.safetensors", out / "llm" / "model.safetensors")
    for name in LLM_FILES:
        shutil.copy(args.run / "llm" / name, out / "llm" / name)
    shutil.copytree(args.run / "text_tokenizer", out / "text_tokenizer", dirs_exist_ok=True)
    shipped: MLLMConfig = dataclasses.replace(config, tokenizer=args.tokenizer, tokenizer_image_size=size)
    if args.cfg_scale is not None:
        shipped = dataclasses.replace(shipped, sampling=dataclasses.replace(shipped.sampling, cfg_scale=args.cfg_scale))
    save_config(shipped, out / MLLM_CONFIG_NAME)
    print(f"wrote {write_manifest(out)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
