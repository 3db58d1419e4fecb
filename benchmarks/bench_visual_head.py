"""The MLLM's visual head on a CPU, side by side in one run: its training loss and its sampler.

Training loss, per step of the quick CIFAR recipe's shape (512 generated positions, 8 semantic depths of 16,384
codes, code width 112, forward + backward, code table trainable):

    ours:   dualtoken.mllm.depth_head.linear_cross_entropy, depth by depth: logits a chunk of 256 rows at a time,
            gradients formed in the forward pass
    plain:  the (M, Q, K) logits held whole, then F.cross_entropy (what the head did before)

Sampling one code per row from 16,384 (the generation loop calls this once per depth and position):

    ours:   dualtoken.mllm.sampling.sample: inverse of the cumulative distribution, one uniform number per row
    plain:  torch.multinomial on the same probabilities (V exponential numbers per row)

The fused losses people would otherwise use (Liger-Kernel's FusedLinearCrossEntropy, Apple's cut-cross-entropy)
are Triton / CUDA kernels and do not run on a CPU, so they are not in the table.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/bench_visual_head.py [--repeats 5]
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from timing import time_it  # benchmarks/timing.py (the script's folder is on sys.path)

from dualtoken.mllm.depth_head import linear_cross_entropy
from dualtoken.mllm.sampling import filter_logits, sample


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=512, help="generated positions per step (8 images x 64)")
    parser.add_argument("--depths", type=int, default=8)
    parser.add_argument("--codes", type=int, default=16384)
    parser.add_argument("--width", type=int, default=112, help="code width (the code_table classifier's C)")
    parser.add_argument("--sample-rows", type=int, default=40, help="rows per sampling call (20 images, guided)")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.manual_seed(0)
    features = torch.randn(args.depths, args.rows, args.width, requires_grad=True)
    table = (torch.randn(args.codes, args.width) * 0.1).requires_grad_()
    bias = torch.zeros(args.depths, args.codes, requires_grad=True)
    targets = torch.randint(0, args.codes, (args.depths, args.rows))

    def ours() -> None:
        sum(linear_cross_entropy(features[d], table, bias[d], targets[d]) for d in range(args.depths)).backward()

    def plain() -> None:
        logits = torch.einsum("dmc,kc->mdk", features, table) + bias  # (M, Q, K)
        F.cross_entropy(logits.flatten(0, 1), targets.T.flatten(), reduction="sum").backward()

    loss_ours, loss_plain = time_it(ours, args.repeats), time_it(plain, args.repeats)
    logits = torch.randn(args.sample_rows, args.codes)
    generator = torch.Generator().manual_seed(0)

    def multinomial() -> None:
        probs = filter_logits(logits, 0, 0.96).softmax(-1)
        torch.multinomial(probs, 1, generator=generator)

    sample_ours = time_it(lambda: sample(logits, 1.0, 0, 0.96, generator), args.repeats * 20)
    sample_plain = time_it(multinomial, args.repeats * 20)
    print(f"{torch.get_num_threads()} thread(s); loss: {args.rows} rows x {args.depths} depths x {args.codes} codes, "
          f"width {args.width}; sampling: {args.sample_rows} rows, top-p 0.96")
    print("| what | ours | plain | plain / ours |")
    print("|---|---|---|---|")
    print(f"| training loss, forward + backward | {loss_ours * 1e3:.0f} ms | {loss_plain * 1e3:.0f} ms | "
          f"{loss_plain / loss_ours:.2f}x |")
    print(f"| one sampling call (top-p filter included) | {sample_ours * 1e3:.2f} ms | {sample_plain * 1e3:.2f} ms | "
          f"{sample_plain / sample_ours:.2f}x |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
