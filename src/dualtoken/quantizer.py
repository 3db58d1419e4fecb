"""Residual quantizer: Q codes per vector from one codebook shared by all depths, kept up to date by EMA.

Encode:   r_0 = x;  c_q = argmin_k ||r_q - e_k||^2;  r_{q+1} = r_q - e_{c_q};  output sum_q e_{c_q}
Training: the codebook follows an exponential moving average of the vectors assigned to each code, and codes whose
          average cluster size falls below 1 are restarted from random vectors of the batch (docs/METHOD.md
          "Residual quantizer").
Data start: ``init_from_data`` fills the codebook with k-means centroids of real inputs, a share of K per depth on
          that depth's residuals (the trainer's ``codebook_init``); the default start is random, as the reference's.
Two schedules of the EMA update: ``per_depth`` (after every depth; the release's `rq`) and ``per_step`` (once per
forward, over the vectors of every depth; the release's `rq_ema`). Distances, EMA and restarts always run in float32,
also under autocast, and synchronise across processes when torch.distributed is initialised.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .config import QuantizerConfig


def nearest_codes(vectors: torch.Tensor, codebook: torch.Tensor, block_rows: int = 256) -> torch.Tensor:
    """Index of the nearest code (squared L2, first index on ties) for each row of ``vectors`` (N, D) -> (N,).

    Distances are ``||v||^2 + ||e||^2 - 2 v.e`` in one addmm, as the reference computes them, but for ``block_rows``
    rows at a time into one reused buffer: the full (N, K) matrix is never held, and each block's argmin reads it
    while it is still in cache.
    """
    codebook_t = codebook.t()  # (D, K)
    codebook_sq = codebook_t.pow(2.0).sum(dim=0, keepdim=True)  # (1, K)
    vectors_sq = vectors.pow(2.0).sum(dim=1, keepdim=True)  # (N, 1)
    codes = torch.empty(vectors.shape[0], dtype=torch.long, device=vectors.device)
    buffer = vectors.new_empty(min(block_rows, vectors.shape[0]), codebook.shape[0])  # (rows, K)
    for start in range(0, vectors.shape[0], block_rows):
        stop = min(start + block_rows, vectors.shape[0])
        distances = buffer[: stop - start]
        torch.add(vectors_sq[start:stop], codebook_sq, out=distances)
        distances.addmm_(vectors[start:stop], codebook_t, alpha=-2.0)
        torch.argmin(distances, dim=1, out=codes[start:stop])
    return codes


def kmeans(
    vectors: torch.Tensor, count: int, iterations: int = 10, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Lloyd's k-means of ``vectors`` (N, D) in float32 -> (``count`` centroids (count, D), their sizes (count,)).

    Centroids start at distinct random rows (drawn with replacement when N < count); a centroid that loses every
    vector is moved to a random row, so none stays empty while there are vectors to spare.
    """
    vectors = vectors.float()
    n = vectors.shape[0]

    def rows(k: int) -> torch.Tensor:
        if n >= k:
            index = torch.randperm(n, generator=generator, device="cpu")[:k]
        else:
            index = torch.randint(n, (k,), generator=generator, device="cpu")
        return vectors[index.to(vectors.device)].clone()

    centroids = rows(count)
    sizes = torch.zeros(count, device=vectors.device)
    for _ in range(iterations):
        codes = nearest_codes(vectors, centroids)
        sizes = torch.bincount(codes, minlength=count).float()
        sums = torch.zeros_like(centroids).index_add_(0, codes, vectors)
        filled = sizes > 0
        centroids[filled] = sums[filled] / sizes[filled, None]
        empty = int((~filled).sum())
        if empty:
            centroids[~filled] = rows(empty)
    sizes = torch.bincount(nearest_codes(vectors, centroids), minlength=count).float()
    return centroids, sizes


def split_codes(total: int, weights: list[float]) -> list[int]:
    """``total`` codes in parts proportional to ``weights`` (each at least 1; the rounding goes to the first)."""
    if not weights or min(weights) <= 0 or len(weights) > total:
        raise ValueError(f"cannot split {total} codes by {weights}")
    parts = [max(1, int(total * w / sum(weights))) for w in weights]
    parts[0] += total - sum(parts)
    return parts


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


@dataclass
class QuantizerOutput:
    quantized: torch.Tensor  # (..., D) straight-through: forward value = sum of the Q code vectors
    codes: torch.Tensor  # (..., Q) int64
    commitment: torch.Tensor  # scalar: mean over depths of mean((x - A_q)^2), A_q the partial sums


class ResidualQuantizer(nn.Module):
    """One shared codebook (K, D) for Q depths; buffers ``codebook``, ``cluster_size``, ``embed_sum``.

    The codebook is a buffer, not a parameter: it is never given to an optimiser, and it gets no gradient.
    """

    def __init__(self, config: QuantizerConfig) -> None:
        super().__init__()
        self.config = config
        codebook = torch.randn(config.codebook_size, config.code_dim)  # (K, D)
        self.register_buffer("codebook", codebook)
        self.register_buffer("cluster_size", torch.zeros(config.codebook_size))  # (K,) EMA of counts
        self.register_buffer("embed_sum", codebook.clone())  # (K, D) EMA of per-code vector sums

    @property
    def depth(self) -> int:
        return self.config.depth

    @property
    def codebook_size(self) -> int:
        return self.config.codebook_size

    def lookup(self, codes: torch.Tensor) -> torch.Tensor:
        """Code vectors of ``codes`` (..., Q) -> (..., Q, D)."""
        return F.embedding(codes, self.codebook)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """Sum over depths of the code vectors: (..., Q) -> (..., D). Any prefix of depths works."""
        return self.lookup(codes).sum(dim=-2)

    @torch.no_grad()
    def init_from_data(
        self,
        vectors: torch.Tensor,
        vectors_per_update: int,
        iterations: int = 10,
        generator: torch.Generator | None = None,
        shares: list[float] | None = None,
    ) -> list[dict[str, float]]:
        """Fill the shared codebook from data: depth q gets a share of the K codes (``shares``, relative weights
        per depth; default equal, depth 0 taking the remainder), the k-means centroids of the residuals the
        depths before it leave; each residual is taken against every code filled so far, as encoding would. The EMA state is set so that each code starts with its expected count per
        update (at least 1, so no code is restarted before it has been tried). Returns per depth: codes filled,
        codes that k-means used, and the mean squared residual left after that depth.

        ``vectors`` (N, D) are quantizer inputs (N >= K keeps every centroid distinct); ``vectors_per_update`` is
        how many vectors one training forward quantizes per depth. Every process must pass the same vectors
        (rank 0's codebook is broadcast when torch.distributed is initialised).
        """
        cfg = self.config
        residual = vectors.detach().float().reshape(-1, cfg.code_dim).to(self.codebook.device)
        counts = split_codes(cfg.codebook_size, shares or [1.0] * cfg.depth)
        sizes = torch.zeros(cfg.codebook_size, device=residual.device)
        filled, report = 0, []
        for share in counts:
            centroids, counts = kmeans(residual, share, iterations, generator)
            self.codebook[filled : filled + share] = centroids
            sizes[filled : filled + share] = counts
            filled += share
            residual = residual - self.codebook[nearest_codes(residual, self.codebook[:filled])]
            report.append(
                {"codes": share, "used": int((counts > 0).sum()), "residual_mse": float(residual.pow(2).mean())}
            )
        if _distributed():
            dist.broadcast(self.codebook, src=0)
            dist.broadcast(sizes, src=0)
        per_update = (sizes * vectors_per_update / residual.shape[0]).clamp_min(1.0)
        self.cluster_size.copy_(per_update)
        self.embed_sum.copy_(self.codebook * per_update[:, None])
        return report

    def forward(self, x: torch.Tensor, update: bool | None = None) -> QuantizerOutput:
        """Quantize ``x`` (..., D). ``update`` (default: training mode) runs the EMA update and restarts."""
        update = self.training if update is None else update
        with torch.autocast(device_type=x.device.type, enabled=False):
            return self._quantize(x, update)

    def _quantize(self, x: torch.Tensor, update: bool) -> QuantizerOutput:
        cfg = self.config
        x32 = x.float()
        residual = x32.detach().reshape(-1, cfg.code_dim).clone()  # (N, D)
        partial = torch.zeros_like(residual)  # A_q: sum of the code vectors so far
        codes, partial_sums, residuals = [], [], []
        for _ in range(cfg.depth):
            code = nearest_codes(residual, self.codebook, cfg.search_block_rows)  # (N,)
            vectors = self.codebook[code]  # looked up before this depth's update
            if update and cfg.ema_schedule == "per_depth":
                self._ema_update(residual, code)
            elif update:
                residuals.append(residual if cfg.per_step_final_residual else residual.clone())
            residual.sub_(vectors)
            partial.add_(vectors)
            codes.append(code)
            partial_sums.append(partial.clone())
        if update and cfg.ema_schedule == "per_step":
            self._ema_update(torch.cat(residuals), torch.cat(codes))

        lead = x.shape[:-1]
        quantized_sum = partial.view(*lead, cfg.code_dim)
        quantized = x32 + (quantized_sum - x32).detach()  # straight-through estimator
        commitment = torch.stack([(x32 - a.view_as(x32)).pow(2).mean() for a in partial_sums]).mean()
        return QuantizerOutput(quantized, torch.stack(codes, dim=-1).view(*lead, cfg.depth), commitment)

    @torch.no_grad()
    def _ema_update(self, vectors: torch.Tensor, codes: torch.Tensor) -> None:
        """EMA of cluster sizes and vector sums, dead-code restart, then the Laplace-smoothed codebook."""
        cfg = self.config
        counts = torch.bincount(codes, minlength=cfg.codebook_size).float()  # (K,)
        sums = torch.zeros_like(self.embed_sum).index_add_(0, codes, vectors)  # (K, D)
        if _distributed():
            dist.all_reduce(sums, op=dist.ReduceOp.SUM)
            dist.all_reduce(counts, op=dist.ReduceOp.SUM)
        self.cluster_size.mul_(cfg.decay).add_(counts, alpha=1 - cfg.decay)
        self.embed_sum.mul_(cfg.decay).add_(sums, alpha=1 - cfg.decay)

        if cfg.restart_unused_codes:
            replacements = self._random_vectors(vectors)  # (K, D)
            if _distributed():
                dist.broadcast(replacements, src=0)
            alive = (self.cluster_size.view(-1, 1) >= 1).float()  # (K, 1)
            self.embed_sum.mul_(alive).add_(replacements * (1 - alive))
            self.cluster_size.mul_(alive.view(-1)).add_(1 - alive.view(-1))

        total = self.cluster_size.sum()
        smoothed = total * (self.cluster_size + cfg.eps) / (total + cfg.codebook_size * cfg.eps)  # (K,)
        self.codebook.copy_(self.embed_sum / smoothed.view(-1, 1))

    def _random_vectors(self, vectors: torch.Tensor) -> torch.Tensor:
        """K rows drawn from ``vectors`` without replacement, tiled with small uniform noise when there are fewer."""
        cfg = self.config
        count = vectors.shape[0]
        if count < cfg.codebook_size:
            repeats = math.ceil(cfg.codebook_size / count)
            tiled = vectors.repeat(repeats, 1)
            noise_scale = vectors.new_full((cfg.code_dim,), cfg.restart_noise / math.sqrt(cfg.code_dim))
            vectors = tiled + torch.rand_like(tiled) * noise_scale
        return vectors[torch.randperm(vectors.shape[0], device=vectors.device)][: cfg.codebook_size]
