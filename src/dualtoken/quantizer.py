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

# columns per group of the blocked argmin: the minimum of each group first, then the argmin inside the first group that
# holds the row's minimum (torch.argmin's answer, first index on ties, in about half its time on a CPU)
ARGMIN_GROUP = 128
# codes rescored exactly per undecided row before a whole row is computed in float64
RESCORED_CANDIDATES = 16


def nearest_codes(vectors: torch.Tensor, codebook: torch.Tensor, block_rows: int = 256) -> torch.Tensor:
    """Index of the nearest code (squared L2, first index on ties) for each row of ``vectors`` (N, D) -> (N,).

    Distances are ``||v||^2 + ||e||^2 - 2 v.e`` in one float32 addmm, as the reference computes them, ``block_rows``
    rows at a time into one reused buffer (the full (N, K) matrix is never held). Where another code lies within
    float32 rounding of a row's nearest one (a bound from the rows' and codes' norms), the row is decided exactly in
    float64 (:func:`settle_codes`): the codes are the exact nearest ones, the same whatever the BLAS library, thread
    count, block size or the cheaper first pass of :func:`residual_codes`.
    """
    codebook_t = codebook.t()  # (D, K)
    codebook_sq = codebook_t.pow(2.0).sum(dim=0, keepdim=True)  # (1, K)
    vectors_sq = vectors.pow(2.0).sum(dim=1, keepdim=True)  # (N, 1)
    scale = (vectors_sq.sqrt() + codebook_sq.max().sqrt()).pow(2).squeeze(1)  # (N,) bounds |terms| of a distance
    slack = float32_dot_slack(codebook.shape[1]) * scale  # (N,) bound on a float32 distance's rounding error
    codes = torch.empty(vectors.shape[0], dtype=torch.long, device=vectors.device)
    buffer = vectors.new_empty(min(block_rows, vectors.shape[0]), codebook.shape[0])  # (rows, K)
    for start in range(0, vectors.shape[0], block_rows):
        stop = min(start + block_rows, vectors.shape[0])
        distances = buffer[: stop - start]
        torch.add(vectors_sq[start:stop], codebook_sq, out=distances)
        distances.addmm_(vectors[start:stop], codebook_t, alpha=-2.0)
        codes[start:stop] = settle_codes(distances, slack[start:stop], vectors[start:stop], codebook)
    return codes


def float32_dot_slack(width: int, steps: int = 0) -> float:
    """Relative rounding bound of a float32 distance (or score) of ``width``-wide vectors, ``steps`` updates after
    its first evaluation: gamma_width for the dot products and norms plus a unit roundoff per addition, times the
    square of the summed norms (the caller's scale)."""
    unit = torch.finfo(torch.float32).eps / 2
    return (width + 3 * steps + 4) * unit / (1 - (width + 3 * steps + 4) * unit)


def settle_codes(
    scores: torch.Tensor, slack: torch.Tensor, vectors: torch.Tensor, codebook: torch.Tensor
) -> torch.Tensor:
    """The exact nearest code of each row, from approximate ``scores`` (R, K): distances up to a per-row shift, each
    within ``slack`` (R,) of the exact value (same shift).

    A row whose runner-up score is more than twice the slack above its best takes the best; the others keep the
    codes within that window (the exact winner is among them), rescore them in float64 and take the nearest,
    first index on ties. Returns (R,) int64.
    """
    best, best_score, runner_up = row_minimum(scores, runner_up=True)
    limit = best_score + 2 * slack  # (R,) the exact winner scores at most this
    undecided = (runner_up <= limit).nonzero().squeeze(1)
    if undecided.numel():
        best[undecided] = _exact_nearest(vectors[undecided], codebook, scores[undecided], limit[undecided])
    return best


def row_minimum(
    scores: torch.Tensor, runner_up: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """(index of each row's minimum, first on ties (R,); its value; the smallest other value) of ``scores`` (R, K).

    Blocked: the minimum of each group of ``ARGMIN_GROUP`` columns, the argmin over the groups (the first group
    holding the row's minimum), then the argmin inside that group; the runner-up is the smaller of the second value
    of that group and the other groups' minima. Values are None unless ``runner_up``.
    """
    rows, width = scores.shape
    if width % ARGMIN_GROUP or width < 2 * ARGMIN_GROUP:
        index = scores.argmin(dim=1)  # (R,)
        if not runner_up:
            return index, None, None
        others = scores.clone()
        value = others.gather(1, index[:, None]).squeeze(1)
        others.scatter_(1, index[:, None], float("inf"))
        return index, value, others.amin(dim=1)
    grouped = scores.view(rows, width // ARGMIN_GROUP, ARGMIN_GROUP)
    group_min = grouped.amin(dim=2)  # (R, K / group)
    group = group_min.argmin(dim=1)  # (R,)
    inside = grouped[torch.arange(rows, device=scores.device), group]  # (R, group) a copy
    offset = inside.argmin(dim=1)
    index = group * ARGMIN_GROUP + offset
    if not runner_up:
        return index, None, None
    value = inside.gather(1, offset[:, None]).squeeze(1)
    inside.scatter_(1, offset[:, None], float("inf"))
    group_min.scatter_(1, group[:, None], float("inf"))
    return index, value, torch.minimum(inside.amin(dim=1), group_min.amin(dim=1))


def _exact_nearest(
    vectors: torch.Tensor, codebook: torch.Tensor, scores: torch.Tensor, limit: torch.Tensor
) -> torch.Tensor:
    """Exact nearest codes (float64 distances, first index on ties) of rows whose candidates are the codes scoring
    at most ``limit``: the ``RESCORED_CANDIDATES`` best when that holds them all, every code otherwise."""
    count = min(RESCORED_CANDIDATES, codebook.shape[0])
    top_scores, candidates = torch.topk(scores, count, dim=1, largest=False)  # (U, C)
    candidates = candidates.sort(dim=1).values  # code order: argmin's first index is the lowest code
    whole = top_scores[:, -1] <= limit if count < codebook.shape[0] else torch.zeros_like(limit, dtype=torch.bool)
    exact = _float64_distances(vectors, codebook, candidates)  # (U, C)
    codes = candidates.gather(1, exact.argmin(dim=1, keepdim=True)).squeeze(1)
    for row in whole.nonzero().squeeze(1).tolist():  # more near-ties than candidates: every code
        every = torch.arange(codebook.shape[0], device=codebook.device)[None]
        codes[row] = _float64_distances(vectors[row : row + 1], codebook, every).argmin()
    return codes


def _float64_distances(vectors: torch.Tensor, codebook: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    """Squared distances (U, C) in float64 of rows ``vectors`` (U, D) to their ``candidates`` (U, C), elementwise:
    each difference and square is exact, and every pair is summed the same way."""
    difference = vectors.double()[:, None, :] - codebook.double()[candidates]  # (U, C, D)
    return difference.pow(2).sum(dim=2)


def residual_codes(
    vectors: torch.Tensor,
    codebook: torch.Tensor,
    depth: int,
    block_rows: int = 256,
    gram: torch.Tensor | None = None,
    low_precision: torch.dtype | None = None,
) -> torch.Tensor:
    """Residual codes (N, Q) of ``vectors`` (N, D): exactly what :func:`nearest_codes` gives depth after depth on
    the float32 residual, from a cheaper first pass scoring every code, ``block_rows`` rows at a time through all
    depths. The scores are ``||e||^2 / 2 - r.e`` (half the distance, less ``||r||^2 / 2``), either

    - from the Gram matrix ``gram`` = E E^T (K, K): scored once per row by one float32 addmm, then updated per depth,
      ``r_{q+1}.E^T = r_q.E^T - G[c_q]``: a memory-bound gather of K floats per row instead of 2 K D FLOP; or
    - per depth by a ``low_precision`` (bf16 / fp16) matmul, where the hardware multiplies those natively.

    Each pass's rounding is bounded per row (:func:`float32_dot_slack`; the low-precision products add four unit
    roundoffs of that dtype), and :func:`settle_codes` decides every row exactly within that bound.
    """
    if (gram is None) == (low_precision is None):
        raise ValueError("residual_codes needs exactly one of gram and low_precision")
    rows, width = vectors.shape
    half_sq = codebook.pow(2).sum(dim=1) / 2  # (K,)
    code_norms = half_sq.mul(2).sqrt()  # (K,)
    largest = code_norms.max()
    codebook_t = codebook.t()  # (D, K)
    low_codebook_t = codebook_t.to(low_precision) if low_precision is not None else None
    low_slack = 4 * torch.finfo(low_precision).eps / 2 + float32_dot_slack(width) if low_precision else 0.0
    codes = torch.empty(rows, depth, dtype=torch.long, device=vectors.device)
    for start in range(0, rows, block_rows):
        residual = vectors[start : start + block_rows].clone()  # (B, D)
        reach = residual.norm(dim=1)  # (B,) bounds the norm of every residual and code sum the scores have seen
        scores = torch.addmm(half_sq, residual, codebook_t, alpha=-1.0) if gram is not None else None  # (B, K)
        for level in range(depth):
            if gram is not None:
                slack = float32_dot_slack(width, level) * (reach + largest).pow(2)
            else:
                scores = half_sq - (residual.to(low_precision) @ low_codebook_t).float()  # (B, K)
                slack = low_slack * (residual.norm(dim=1) + largest).pow(2)
            code = settle_codes(scores, slack, residual, codebook)  # (B,)
            codes[start : start + block_rows, level] = code
            residual.sub_(codebook[code])
            if gram is not None and level + 1 < depth:
                scores.add_(gram.index_select(0, code))
                reach.add_(code_norms[code])
    return codes


class GramCache:
    """The Gram matrix E E^T (K, K) of a quantizer's codebook for :func:`residual_codes`, built once the rows
    searched at the current codebook would have paid for it (rows x (Q - 1) >= K: its one matmul costs what K rows'
    search of one depth costs) and kept while the codebook stays equal to the copy it was built from."""

    def __init__(self) -> None:
        self.source: torch.Tensor | None = None  # (K, D) the codebook the rows were counted at
        self.gram: torch.Tensor | None = None
        self.rows = 0

    def get(self, codebook: torch.Tensor, rows: int, depth: int) -> torch.Tensor | None:
        if self.source is None or self.source.shape != codebook.shape or not torch.equal(self.source, codebook):
            self.source, self.gram, self.rows = codebook.clone(), None, 0
        if self.gram is None:
            self.rows += rows
            if self.rows * (depth - 1) >= codebook.shape[0]:
                self.gram = codebook @ codebook.t()  # (K, K)
        return self.gram


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


def autocast_matmul_dtype(device_type: str) -> torch.dtype | None:
    """The dtype autocast runs matmuls in on ``device_type`` here (None: autocast is off)."""
    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None


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
        low_precision = autocast_matmul_dtype(x.device.type)  # read before autocast is switched off here
        with torch.autocast(device_type=x.device.type, enabled=False):
            return self._quantize(x, update, low_precision)

    def _quantize(self, x: torch.Tensor, update: bool, low_precision: torch.dtype | None = None) -> QuantizerOutput:
        cfg = self.config
        x32 = x.float()
        residual = x32.detach().reshape(-1, cfg.code_dim).clone()  # (N, D)
        partial = torch.zeros_like(residual)  # A_q: sum of the code vectors so far
        codes, partial_sums, residuals = [], [], []
        planned = None if update else self._planned_codes(residual, low_precision)  # (N, Q) or None
        for level in range(cfg.depth):
            if planned is not None:
                code = planned[:, level]
            else:
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

    def _planned_codes(self, residual: torch.Tensor, low_precision: torch.dtype | None) -> torch.Tensor | None:
        """Every depth's codes (N, Q) at once for a forward that leaves the codebook as it is, through a cheaper first
        pass of :func:`residual_codes` where one applies: a ``low_precision`` matmul (the autocast dtype, bf16 or
        fp16), else the cached Gram matrix for codes at least ``search_gram_min_dim`` wide whose Gram matrix fits in
        ``search_gram_max_mib``. None: the per-depth float32 search. The codes are the same either way."""
        cfg = self.config
        if low_precision is not None:
            return residual_codes(residual, self.codebook, cfg.depth, cfg.search_block_rows, low_precision=low_precision)
        gram_mib = cfg.codebook_size**2 * self.codebook.element_size() / 2**20
        if cfg.depth < 2 or cfg.code_dim < cfg.search_gram_min_dim or gram_mib > cfg.search_gram_max_mib:
            return None
        cache = self.__dict__.setdefault("_gram_cache", GramCache())  # not a buffer: never saved
        gram = cache.get(self.codebook, residual.shape[0], cfg.depth)
        return None if gram is None else residual_codes(residual, self.codebook, cfg.depth, cfg.search_block_rows, gram)

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
