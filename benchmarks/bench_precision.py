"""Precision and search speed side by side in one run: fp32 against auto (and forced bf16 at small sizes).

    CPU       the bf16 flags torch reports (dualtoken.precision.cpu_bf16_flags) and what auto resolves to here
    matmul    float32 peak (2048^3) and one depth's semantic search matmul (256 x 112 @ 112 x 16,384), fp32 and bf16
    search    residual quantization, 8 depths of 16,384 codes: the release's shape (width 32, 8 x 729 vectors) and the
              shipped semantic shape (width 112, 8 x 256 latents of real photos): the textbook search, the per-depth
              float32 search (nearest_codes), the Gram-matrix first pass (residual_codes, matrix cached), the
              quantizer's eval forward under fp32 and under auto, and a bf16 first pass on a few rows
    model     dualtoken-efflite0 encode / decode / reconstruct images/s at batch 1 and 8 under fp32 and auto (auto
              is float32 where the CPU has no bf16 matrix units), encode with the Gram matrix switched off, and the
              EfficientNet-Lite0 forward alone as the reference

Every code path that should give the same codes is checked to do so. Ratios are within this one run.
Run: ``PYTHONPATH=src .venv/bin/python benchmarks/bench_precision.py [--repeats 3] [--json out.json]``.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch
from timing import time_it  # benchmarks/timing.py (the script's folder is on sys.path)

from dualtoken import DualTokenizer
from dualtoken.config import QuantizerConfig
from dualtoken.io import list_images, load_image
from dualtoken.precision import cpu_bf16_flags, explain, inference_autocast
from dualtoken.quantizer import ResidualQuantizer, nearest_codes, residual_codes

KODAK = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "kodak"


def textbook_codes(x: torch.Tensor, codebook: torch.Tensor, depth: int) -> torch.Tensor:
    residual, codes = x.clone(), []
    for _ in range(depth):
        distances = residual.pow(2).sum(1, keepdim=True) + codebook.pow(2).sum(1)[None] - 2 * residual @ codebook.t()
        codes.append(distances.argmin(1))
        residual = residual - codebook[codes[-1]]
    return torch.stack(codes, 1)


def per_depth_codes(x: torch.Tensor, codebook: torch.Tensor, depth: int) -> torch.Tensor:
    residual, codes = x.clone(), []
    for _ in range(depth):
        codes.append(nearest_codes(residual, codebook))
        residual.sub_(codebook[codes[-1]])
    return torch.stack(codes, 1)


def matmul_rates(repeats: int) -> list[tuple[str, float]]:
    big = torch.randn(2048, 2048)
    rows, codes = torch.randn(256, 112), torch.randn(112, 16384)
    small_rows, small_codes = rows[:32].bfloat16(), codes.bfloat16()
    return [
        ("float32 2048^3", 2 * 2048**3 / time_it(lambda: big @ big, repeats)),
        ("float32 256x112 @ 112x16384", 2 * 256 * 112 * 16384 / time_it(lambda: rows @ codes, repeats)),
        ("bf16 32x112 @ 112x16384 (forced)", 2 * 32 * 112 * 16384 / time_it(lambda: small_rows @ small_codes, 1)),
    ]


def search_rows(name: str, x: torch.Tensor, codebook: torch.Tensor, depth: int, repeats: int) -> list[dict]:
    """Seconds per batch of each search of ``x`` (N, D); all must give the per-depth float32 search's codes."""
    n, width = x.shape
    flop = 2 * n * codebook.shape[0] * width * depth
    expected = per_depth_codes(x, codebook, depth)
    start = time.perf_counter()
    gram = codebook @ codebook.t()  # (K, K)
    gram_seconds = time.perf_counter() - start
    quantizer = ResidualQuantizer(QuantizerConfig(codebook.shape[0], width, depth)).eval()  # default settings
    quantizer.codebook.copy_(codebook)

    def quantizer_codes(precision: str) -> torch.Tensor:
        with inference_autocast(precision, x.device):  # the context encode/decode run their search in
            return quantizer(x).codes.reshape(n, depth)

    methods = {
        "textbook (full distances, argmin)": lambda: textbook_codes(x, codebook, depth),
        "float32 per-depth search (nearest_codes)": lambda: per_depth_codes(x, codebook, depth),
        "float32 Gram first pass (cached)": lambda: residual_codes(x, codebook, depth, gram=gram),
        "quantizer eval forward, fp32": lambda: quantizer_codes("fp32"),
        "quantizer eval forward, auto": lambda: quantizer_codes("auto"),
    }
    rows = []
    for method, run in methods.items():
        codes = run()
        same = bool(torch.equal(codes, expected))
        seconds = time_it(run, repeats)
        rows.append({"shape": name, "method": method, "seconds": seconds, "gflops": flop / seconds / 1e9,
                     "same_codes": same})
    few = x[:32]
    low = residual_codes(few, codebook, depth, low_precision=torch.bfloat16)
    seconds = time_it(lambda: residual_codes(few, codebook, depth, low_precision=torch.bfloat16), 1) * n / 32
    rows.append({"shape": name, "method": "bf16 first pass, forced (32 rows, scaled)", "seconds": seconds,
                 "gflops": flop / seconds / 1e9, "same_codes": bool(torch.equal(low, expected[:32]))})
    rows.append({"shape": name, "method": "(building the Gram matrix, once per codebook)", "seconds": gram_seconds,
                 "gflops": 2 * codebook.shape[0] ** 2 * width / gram_seconds / 1e9, "same_codes": True})
    return rows


def photos(tokenizer: DualTokenizer, count: int) -> torch.Tensor:
    """``count`` Kodak photos at the model's size where present, random images otherwise."""
    if KODAK.is_dir():
        files = (list_images(KODAK) * count)[:count]
        return torch.stack([load_image(f, tokenizer.image_size) for f in files])
    return torch.rand(count, 3, *tokenizer.image_size) * 2 - 1


def tower_forward(tokenizer: DualTokenizer, images: torch.Tensor) -> torch.Tensor:
    """The EfficientNet-Lite0 forward alone: every layer and the head, no projection, search or decoder."""
    tower = tokenizer.backbone
    state = tower.embed(images)
    for layer in range(1, tower.num_layers + 1):
        state = tower.run_layer(layer, state)
    return tower.pool(state)


def batch_rows(tokenizer: DualTokenizer, batch: int, repeats: int) -> list[dict]:
    """images/s of one batch size: encode / decode / reconstruct under fp32 and auto, encode with the Gram matrix
    off, and the tower alone."""
    images = photos(tokenizer, batch)
    codes = tokenizer.encode(images, precision="fp32").pixel
    runs = {}
    for precision in ("fp32", "auto"):
        runs[("encode", precision)] = lambda p=precision: tokenizer.encode(images, precision=p)
        runs[("decode", precision)] = lambda p=precision: tokenizer.decode(codes, precision=p)
        runs[("reconstruct", precision)] = lambda p=precision: tokenizer.decode(
            tokenizer.encode(images, precision=p).pixel, p
        )
    runs[("EfficientNet-Lite0 forward alone", "fp32")] = lambda: tower_forward(tokenizer, images)
    rows = [{"batch": batch, "operation": op, "precision": precision, "images_per_s": batch / time_it(run, repeats)}
            for (op, precision), run in runs.items()]
    semantic = tokenizer.quantizer("semantic").config
    limit, semantic.search_gram_max_mib = semantic.search_gram_max_mib, 0  # the per-depth float32 search only
    seconds = time_it(lambda: tokenizer.encode(images, precision="fp32"), repeats)
    semantic.search_gram_max_mib = limit
    rows.append({"batch": batch, "operation": "encode, Gram matrix off", "precision": "fp32",
                 "images_per_s": batch / seconds})
    return rows


def model_rows(tokenizer: DualTokenizer, repeats: int) -> list[dict]:
    rows = batch_rows(tokenizer, 8, repeats) + batch_rows(tokenizer, 1, repeats)
    one = photos(tokenizer, 1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        seconds = time_it(lambda: tower_forward(tokenizer, one), 1)
    rows.append({"batch": 1, "operation": "EfficientNet-Lite0 forward alone", "precision": "bf16 autocast, forced",
                 "images_per_s": 1 / seconds})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-model", action="store_true", help="the matmul and search sections only")
    parser.add_argument("--json", help="also write every row to this file")
    args = parser.parse_args()
    torch.manual_seed(0)
    load_before = os.getloadavg()[0]
    flags = cpu_bf16_flags()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, load average {load_before:.1f}")
    print("CPU flags: " + ", ".join(f"{k} {'yes' if v else 'no'}" for k, v in flags.items()))
    print(f"auto resolves to: {explain('auto', 'cpu')}")
    result: dict = {"flags": flags, "load_before": load_before}
    with torch.inference_mode():
        result["matmul"] = matmul_rates(args.repeats)
        print("\n| matmul | GFLOP/s |\n|---|---|")
        for name, rate in result["matmul"]:
            print(f"| {name} | {rate / 1e9:.1f} |")

        tokenizer = DualTokenizer.from_pretrained("dualtoken-efflite0")
        release = ResidualQuantizer(QuantizerConfig(16384, 32, 8))  # random codebook, the release's shape
        shipped = tokenizer.quantizer("semantic").codebook
        latents = tokenizer._run_to_taps(photos(tokenizer, 8)).semantic_latent.reshape(-1, shipped.shape[1])
        result["search"] = search_rows("release K 16384, D 32, Q 8, N 8x729", torch.randn(8 * 729, 32),
                                       release.codebook, 8, args.repeats)
        result["search"] += search_rows("shipped semantic K 16384, D 112, Q 8, N 8x256", latents, shipped, 8,
                                        args.repeats)
        print("\n| shape | search | s/batch | GFLOP/s | vs per-depth | same codes |\n|---|---|---|---|---|---|")
        for row in result["search"]:
            base = next(r["seconds"] for r in result["search"]
                        if r["shape"] == row["shape"] and r["method"].startswith("float32 per-depth"))
            ratio = "-" if row["method"].startswith("(") else f"{base / row['seconds']:.2f}x"
            print(f"| {row['shape']} | {row['method']} | {row['seconds']:.3f} | {row['gflops']:.1f} | {ratio} | "
                  f"{'yes' if row['same_codes'] else 'NO'} |")

        if not args.skip_model:
            result["model"] = model_rows(tokenizer, args.repeats)
            print("\n| batch | operation | precision | images/s | vs tower alone |\n|---|---|---|---|---|")
            for row in result["model"]:
                tower = next(r["images_per_s"] for r in result["model"] if r["batch"] == row["batch"]
                             and r["operation"].startswith("EfficientNet") and r["precision"] == "fp32")
                print(f"| {row['batch']} | {row['operation']} | {row['precision']} | {row['images_per_s']:.2f} | "
                      f"{row['images_per_s'] / tower:.2f}x |")
    result["load_after"] = os.getloadavg()[0]
    print(f"\nload average at the end {result['load_after']:.1f} (other processes share this CPU)")
    print("training images/s under bf16: not measured (no bf16 matrix units here); bench_train_gpu.py: no GPU")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
