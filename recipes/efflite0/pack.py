"""Pick the largest export step that every variant of a train_all.sh run reached, and write each variant's
tokenizer at that step as a float16 model folder (config.json + model.safetensors).

usage: python recipes/efflite0/pack.py RUN_ROOT OUT_DIR
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import torch

from dualtoken import DualTokenizer


def common_export_step(variants: list[Path]) -> tuple[int, dict[str, list[int]]]:
    """The largest export step every variant folder reached, and each one's export steps."""
    steps = {v.name: sorted(int(e.name.split("-")[1]) for e in v.glob("export-*")) for v in variants}
    if not steps or not all(steps.values()):
        raise SystemExit(f"a variant has no export: {steps}")
    return min(s[-1] for s in steps.values()), steps


def main(root: Path, out: Path) -> None:
    variants = sorted(p for p in root.iterdir() if p.is_dir())
    common, steps = common_export_step(variants)
    out.mkdir(parents=True, exist_ok=True)
    for variant in variants:
        source = variant / f"export-{common:08d}"
        target = DualTokenizer.from_pretrained(source).save_pretrained(out / variant.name, dtype=torch.float16)
        if (variant / "metrics.jsonl").is_file():
            shutil.copy2(variant / "metrics.jsonl", target / "metrics.jsonl")
    (out / "steps.json").write_text(json.dumps({"common_step": common, "exports": steps}, indent=2))
    print(json.dumps({"common_step": common, "last": {k: v[-1] for k, v in steps.items()}}))


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
