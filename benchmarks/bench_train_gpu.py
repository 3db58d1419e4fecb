"""The trainer on one CUDA GPU: checks and throughput, side by side in one run.

Checks (``dualtoken-tiny``, generated images, a frozen copy of the initial tower as teacher):
    bf16:    30 steps with bf16 autocast: the codebooks stay float32, the loss falls, held-out PSNR rises
    resume:  16 steps straight vs 8 + resume + 8 (GPU kernels are not bitwise deterministic: relative gap shown)
    fp16:    12 steps with fp16 autocast and the grad scaler
Throughput (full stage-1 objective: EfficientNet-Lite0 perceptual at 224, GAN on from step 0): images/s and
peak CUDA memory of ``dualtoken-b16-224-rvq4`` (batch 32) and ``dualtoken-so400m-256-rvq4`` (batch 16), each
with and without gradient checkpointing, with ratios.

Run: ``python benchmarks/bench_train_gpu.py [--out results.json]`` (needs CUDA).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from dualtoken.training import load_train_config, tokenizer_engine
from dualtoken.training.distributed import unwrap


def write_images(folder: Path, size: int, count: int = 64) -> Path:
    if not folder.exists():
        folder.mkdir(parents=True)
        rng = np.random.default_rng(0)
        for index in range(count):
            low = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
            Image.fromarray(low).resize((size + 16, size + 8), Image.BICUBIC).save(
                folder / f"{index:03d}.png"
            )
    return folder


class Bench:
    def __init__(self, work: Path) -> None:
        self.work = work

    def config(self, name: str, *extra: str):
        base = [
            "teacher=initial",
            f"output_dir={self.work / name}",
            "log.progress=false",
            "log.console=false",
            "log.tensorboard=false",
            "log.grid_every=0",
            "log.codebook_every=1000",
            "optimizer.warmup_steps=2",
            "optimizer.lr=0.001",
            "disc_optimizer.warmup_steps=1",
            "disc_optimizer.lr=0.0005",
            "disc_optimizer.min_lr=0",
            "data.num_workers=8",
            "checkpoint.every=1000000",
        ]
        return load_train_config(None, base + list(extra))

    def records(self, name: str, kind: str = "train") -> list[dict]:
        lines = (self.work / name / "metrics.jsonl").read_text().splitlines()
        return [r for r in map(json.loads, lines) if r["kind"] == kind]

    def tiny(self) -> list[str]:
        images = write_images(self.work / "img64", 64)
        return [
            "model=dualtoken-tiny",
            f"data.train={images}",
            f"data.eval={images}",
            "data.batch_size=16",
            "loss.perceptual_resize=64",
            "loss.gan.start_step=10",
            "loss.gan.discriminator.channels=[32,32,64,64]",
            "log.every=1",
            "log.eval_every=10",
        ]

    def bf16(self) -> dict:
        trainer = tokenizer_engine(self.config("tiny", *self.tiny(), "max_steps=30"))
        trainer.fit()
        tok, losses = unwrap(trainer.model), [r["loss"] for r in self.records("tiny")]
        return {
            "autocast": str(trainer.autocast_dtype),
            "codebook_dtypes": [
                str(tok.pixel.quantizer.codebook.dtype),
                str(tok.semantic.quantizer.codebook.dtype),
            ],
            "loss_first5": float(np.mean(losses[:5])),
            "loss_last5": float(np.mean(losses[-5:])),
            "heldout_psnr": [r["psnr"] for r in self.records("tiny", "eval")],
        }

    def resume(self) -> dict:
        tokenizer_engine(self.config("straight", *self.tiny(), "max_steps=16")).fit()
        tokenizer_engine(self.config("resumed", *self.tiny(), "max_steps=16")).fit(stop_at=8)
        tokenizer_engine(self.config("resumed", *self.tiny(), "max_steps=16")).fit()
        a = [r["loss"] for r in self.records("straight")]
        b = [r["loss"] for r in self.records("resumed")]
        gap = [abs(x - y) / abs(x) for x, y in zip(a, b)]
        return {"max_relative_gap_before_resume": max(gap[:8]), "max_relative_gap_after_resume": max(gap[8:])}

    def fp16(self) -> dict:
        trainer = tokenizer_engine(self.config("fp16", *self.tiny(), "max_steps=12", "precision=fp16"))
        trainer.fit()
        losses = [r["loss"] for r in self.records("fp16")]
        return {"scaler_scale": trainer.scaler.get_scale(), "all_finite": bool(np.isfinite(losses).all())}

    def throughput(self, model: str, size: int, batch: int, steps: int, *extra: str) -> dict:
        name = f"{model}-{batch}-{len(extra)}"
        torch.cuda.reset_peak_memory_stats()
        config = self.config(
            name,
            f"model={model}",
            f"data.train={write_images(self.work / f'img{size}', size)}",
            f"data.batch_size={batch}",
            f"max_steps={steps}",
            "log.every=1",
            "log.eval_every=0",
            "loss.gan.start_step=0",
            *extra,
        )
        tokenizer_engine(config).fit()
        timed = self.records(name)[2:]  # the first steps warm up kernels and workers
        return {
            "samples_per_s": float(np.median([r["samples_per_s"] for r in timed])),
            "peak_mb": max(r["peak_memory_mb"] for r in timed),
        }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", default=None, help="also write the results as JSON here")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_train_gpu.py needs a CUDA GPU")
    results: dict = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__}
    with tempfile.TemporaryDirectory() as tmp:
        bench = Bench(Path(tmp))
        results["bf16"] = bench.bf16()
        results["resume"] = bench.resume()
        results["fp16"] = bench.fp16()
        cases = (("dualtoken-b16-224-rvq4", 224, 32, 8), ("dualtoken-so400m-256-rvq4", 256, 16, 6))
        for model, size, batch, steps in cases:
            plain = bench.throughput(model, size, batch, steps)
            ckpt = bench.throughput(model, size, batch, steps, "gradient_checkpointing=true")
            results[model] = {
                "batch": batch,
                "plain": plain,
                "checkpointing": ckpt,
                "speed_ratio": ckpt["samples_per_s"] / plain["samples_per_s"],
                "memory_ratio": ckpt["peak_mb"] / plain["peak_mb"],
            }
    print(json.dumps(results, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
