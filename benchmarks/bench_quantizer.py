"""Residual quantizer speed at the release's shapes, side by side in one run.

    ours:     dualtoken.quantizer.ResidualQuantizer in eval mode (blocked fused distance, blocked argmin, exact
              decision of rounding-level ties; the Gram-matrix first pass for codes at least 64 wide)
    previous: the float32 search before that (blocked fused distance, then torch.argmin)
    plain:    one full distance matmul per depth, argmin, subtract (the textbook method)
    library:  vector_quantize_pytorch.ResidualVQ with a shared codebook (what people would otherwise use)

Prints seconds per batch, ratios, and the fraction of this CPU's measured fp32 matmul rate that the search reaches
(2*N*K*D FLOP per depth). Run: ``.venv/bin/python benchmarks/bench_quantizer.py [--repeats 3]``.
"""

from __future__ import annotations

import argparse

import torch
from timing import time_it  # benchmarks/timing.py (the script's folder is on sys.path)

from dualtoken.config import QuantizerConfig
from dualtoken.quantizer import ResidualQuantizer


def plain_residual_codes(x: torch.Tensor, codebook: torch.Tensor, depth: int) -> torch.Tensor:
    residual, codes = x.clone(), []
    for _ in range(depth):
        distances = residual.pow(2).sum(1, keepdim=True) + codebook.pow(2).sum(1)[None] - 2 * residual @ codebook.t()
        code = distances.argmin(1)
        residual = residual - codebook[code]
        codes.append(code)
    return torch.stack(codes, -1)


def previous_residual_codes(x: torch.Tensor, codebook: torch.Tensor, depth: int, block_rows: int = 256) -> torch.Tensor:
    """The float32 search before the exact search (blocked addmm, then torch.argmin per block), depth by depth."""
    residual, codes = x.clone(), []
    codebook_t = codebook.t()
    codebook_sq = codebook_t.pow(2).sum(0, keepdim=True)
    for _ in range(depth):
        residual_sq, code = residual.pow(2).sum(1, keepdim=True), []
        for start in range(0, residual.shape[0], block_rows):
            distances = torch.add(residual_sq[start : start + block_rows], codebook_sq)
            distances.addmm_(residual[start : start + block_rows], codebook_t, alpha=-2.0)
            code.append(distances.argmin(1))
        codes.append(torch.cat(code))
        residual.sub_(codebook[codes[-1]])
    return torch.stack(codes, -1)


def matmul_rate(size: int = 2048, repeats: int = 5) -> float:
    a, b = torch.randn(size, size), torch.randn(size, size)
    seconds = time_it(lambda: a @ b, repeats)
    return 2 * size**3 / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--codebook-size", type=int, default=16384)
    parser.add_argument("--code-dim", type=int, default=32)
    parser.add_argument("--depth", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=729)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-library", action="store_true", help="skip vector_quantize_pytorch")
    args = parser.parse_args()

    torch.manual_seed(0)
    K, D, Q, N = args.codebook_size, args.code_dim, args.depth, args.batch * args.tokens
    quantizer = ResidualQuantizer(QuantizerConfig(codebook_size=K, code_dim=D, depth=Q)).eval()
    x = torch.randn(args.batch, args.tokens, D)

    with torch.inference_mode():
        ours_codes = quantizer(x).codes.reshape(N, Q)
        plain_codes = plain_residual_codes(x.reshape(N, D), quantizer.codebook, Q)
        agree = (ours_codes == plain_codes).float().mean().item()
        results = {
            "ours": time_it(lambda: quantizer(x), args.repeats),
            "previous float32 search (torch.argmin)": time_it(
                lambda: previous_residual_codes(x.reshape(N, D), quantizer.codebook, Q), args.repeats
            ),
            "plain": time_it(lambda: plain_residual_codes(x.reshape(N, D), quantizer.codebook, Q), args.repeats),
        }
        if not args.skip_library:
            from vector_quantize_pytorch import ResidualVQ

            library = ResidualVQ(dim=D, num_quantizers=Q, codebook_size=K, shared_codebook=True).eval()
            results["vector_quantize_pytorch.ResidualVQ"] = time_it(lambda: library(x), args.repeats)
        peak = matmul_rate()

    flop = 2 * N * K * D * Q
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; N={N} vectors ({args.batch}x{args.tokens}), K={K}, D={D}, Q={Q}")
    print(f"measured fp32 matmul peak: {peak / 1e9:.1f} GFLOP/s; ours and plain agree on {agree:.2%} of codes")
    print(f"{'method':38s} {'s/batch':>9s} {'GFLOP/s':>9s} {'of peak':>8s} {'vs ours':>8s}")
    for name, seconds in results.items():
        rate = flop / seconds
        print(f"{name:38s} {seconds:9.3f} {rate / 1e9:9.1f} {rate / peak:8.1%} {seconds / results['ours']:7.2f}x")


if __name__ == "__main__":
    main()
