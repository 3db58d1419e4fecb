"""Training-step throughput and peak memory on this machine, side by side in one run.

For each model (``dualtoken-tiny`` at batch 8 and the mid-size ``dualtoken-b16-224-rvq4`` at batch 2, both random
init with a frozen copy of the initial tower as teacher) three variants of a full trainer step are timed:

    core:        distillation + commitment + pixel MSE (no perceptual network, no GAN)
    full:        core + EfficientNet-Lite0 perceptual loss + GAN (discriminator step included)
    full+ckpt:   full with gradient checkpointing of the tower
    core+determ: core with ``deterministic: true`` (its cost: docs/TRAINING.md "Determinism")

Each variant runs in its own process (so its peak resident memory is its own) through the training engine on
generated images, data loading included; the first step is warm-up and not counted. Prints images/s, seconds per
step, peak memory (CUDA allocations on a GPU, resident set size on the CPU) and ratios against ``core``.

Run: ``OMP_NUM_THREADS=2 .venv/bin/python benchmarks/bench_train.py [--steps 4] [--models dualtoken-tiny]
[--variants core core+determ] [--repeats 3]``
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

MODELS = {"dualtoken-tiny": 8, "dualtoken-b16-224-rvq4": 2}
VARIANTS = {
    "core": ["loss.perceptual=0", "loss.perceptual_kind=none", "loss.gan.enabled=false"],
    "full": ["loss.perceptual_kind=effnet_lite0", "loss.gan.start_step=0"],
    "full+ckpt": [
        "loss.perceptual_kind=effnet_lite0",
        "loss.gan.start_step=0",
        "gradient_checkpointing=true",
    ],
    # core with deterministic=true: one intra-op thread, deterministic kernels, MKL's reproducible code paths
    "core+determ": ["loss.perceptual=0", "loss.perceptual_kind=none", "loss.gan.enabled=false", "deterministic=true"],
}


def write_images(folder: Path, count: int, size: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for index in range(count):
        low = rng.integers(0, 256, size=(8, 8, 3), dtype=np.uint8)
        Image.fromarray(low).resize((size, size), Image.BICUBIC).save(folder / f"{index:04d}.png")
    return folder


def run_case(model: str, variant: str, steps: int, work: Path, repeat: int = 0) -> dict:
    """One variant in a fresh process; returns its per-step records."""
    from dualtoken import get_config

    size = get_config(model).backbone.image_size
    data = write_images(work / f"data-{size}", MODELS[model] * 4, size)
    out = work / f"{model}-{variant}-{repeat}"
    overrides = [
        f"model={model}",
        "teacher=initial",
        f"output_dir={out}",
        f"max_steps={steps + 1}",
        f"data.train={data}",
        f"data.batch_size={MODELS[model]}",
        "data.num_workers=1",
        "optimizer.warmup_steps=1",
        "log.every=1",
        "log.codebook_every=1000",
        "log.eval_every=0",
        "log.grid_every=0",
        "log.console=false",
        "log.progress=false",
        "log.tensorboard=false",
        "checkpoint.every=1000000",
        "checkpoint.resume=false",
        "loss.gan.discriminator.channels=[32,32,64,64]",
        *VARIANTS[variant],
    ]
    code = (
        "import json, sys\n"
        "from dualtoken.training import load_train_config, tokenizer_engine\n"
        "trainer = tokenizer_engine(load_train_config(None, json.loads(sys.argv[1])))\n"
        "trainer.run()\n"
    )
    subprocess.run([sys.executable, "-c", code, json.dumps(overrides)], check=True)
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == "train"]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--steps", type=int, default=4, help="timed steps per variant (after one warm-up step)"
    )
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--repeats", type=int, default=1, help="runs per variant, interleaved (A B A B ...)")
    args = parser.parse_args()
    import torch

    device = "cuda" if torch.cuda.is_available() else f"cpu ({torch.get_num_threads()} threads)"
    print(f"device: {device}; {args.steps} timed steps per variant; first step not counted")
    with tempfile.TemporaryDirectory() as tmp:
        for model in args.models:
            rows, variants = {}, ["core", *[v for v in args.variants if v != "core"]]
            runs = {v: [] for v in variants}
            for repeat in range(args.repeats):
                for variant in variants:
                    runs[variant] += run_case(model, variant, args.steps, Path(tmp), repeat)[1:]
            for variant, records in runs.items():
                rate = statistics.median(r["samples_per_s"] for r in records)
                rows[variant] = (rate, MODELS[model] / rate, max(r["peak_memory_mb"] for r in records))
            print(f"\n{model} (batch {MODELS[model]})")
            print(
                f"{'variant':<12}{'images/s':>10}{'s/step':>9}{'peak MB':>10}{'speed vs core':>15}{'memory vs core':>16}"
            )
            base_rate, _, base_memory = rows["core"]
            for variant, (rate, seconds, memory) in rows.items():
                print(
                    f"{variant:<12}{rate:>10.2f}{seconds:>9.2f}{memory:>10.0f}"
                    f"{rate / base_rate:>14.2f}x{memory / base_memory:>15.2f}x"
                )


if __name__ == "__main__":
    main()
