"""Encode and decode throughput (images/s) and peak memory of DualTokenizer on this CPU.

Each (config, operation) runs in its own process so that its peak resident memory is its own.
Run: ``.venv/bin/python benchmarks/bench_tokenizer.py [--configs dualtoken-tiny dualtoken-b16-224-rvq4]``.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import resource

from timing import time_it  # benchmarks/timing.py (the script's folder is on sys.path)


def _measure(config: str, operation: str, batch: int, repeats: int, queue) -> None:
    import torch

    from dualtoken import DualTokenizer

    torch.manual_seed(0)
    tokenizer = DualTokenizer.from_config(config).eval()
    images = torch.rand(batch, 3, *tokenizer.image_size) * 2 - 1
    with torch.inference_mode():
        codes = tokenizer.encode(images).pixel
        run = (lambda: tokenizer.encode(images)) if operation == "encode" else (lambda: tokenizer.decode(codes))
        baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        seconds = time_it(run, repeats)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    queue.put({"config": config, "operation": operation, "images_per_s": batch / seconds,
               "peak_rss_mib": peak / 1024, "model_rss_mib": baseline / 1024})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", default=["dualtoken-tiny", "dualtoken-b16-224-rvq4"])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", help="also write the rows to this file")
    args = parser.parse_args()

    context = mp.get_context("spawn")
    rows = []
    for config in args.configs:
        for operation in ("encode", "decode"):
            queue = context.Queue()
            process = context.Process(target=_measure, args=(config, operation, args.batch, args.repeats, queue))
            process.start()
            rows.append(queue.get())
            process.join()
    print(f"{'config':28s} {'op':7s} {'images/s':>9s} {'peak RSS MiB':>13s}")
    for row in rows:
        print(f"{row['config']:28s} {row['operation']:7s} {row['images_per_s']:9.2f} {row['peak_rss_mib']:13.0f}")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(rows, handle, indent=2)


if __name__ == "__main__":
    main()
