"""A visual head (docs/METHOD.md "Generation"): the LLM state at a visual position -> the Q residual codes of one vocabulary.

Depth inputs: I_1 = gen_projector(h); I_d = W_in·Σ_{d'<d} E[c_d'] for d > 1 (the partial residual
reconstruction), plus a learned depth embedding. A causal transformer over the Q depths, a final LayerNorm and
one classifier per depth give the logits of code d from I_1..I_d: its own K x width weights (``per_depth``), or
(``code_table``) a map of the state into code space scored against the K code vectors, l_k = <P_d x, e_k> + b_k.

Training never holds the (M, Q, K) logits: :func:`linear_cross_entropy` forms each depth's loss and its gradients a
chunk of rows at a time (with K = 16,384 codes the whole tensor is hundreds of MB a step, and on a CPU allocating it
costs more than the arithmetic).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from .config import DepthHeadConfig
from .fusion import two_layer_mlp


class _LinearCrossEntropy(torch.autograd.Function):
    """sum_n CE(x_n · tableᵀ + bias, t_n), the logits one chunk of rows at a time.

    The loss is a plain sum, so its gradient is one scalar times the gradients of the sum: those are formed in the
    forward pass, chunk by chunk (softmax - one-hot, then two matmuls), and only scaled in ``backward``."""

    @staticmethod
    def forward(ctx, features, table, bias, targets, chunk_rows):  # noqa: ANN001, ANN205 (autograd's signature)
        need_features, need_table, need_bias = ctx.needs_input_grad[:3]
        grad_features = torch.zeros_like(features) if need_features else None  # (N, C)
        grad_table = torch.zeros_like(table) if need_table else None  # (K, C)
        grad_bias = torch.zeros_like(bias) if need_bias else None  # (K,)
        total = features.new_zeros(())
        for start in range(0, features.shape[0], chunk_rows):
            rows = slice(start, start + chunk_rows)
            x, t = features[rows], targets[rows, None]
            logits = torch.addmm(bias, x, table.T)  # (n, K)
            lse = logits.logsumexp(dim=-1, keepdim=True)  # (n, 1)
            total += (lse - logits.gather(1, t)).sum()
            grad_logits = logits.sub_(lse).exp_().scatter_add_(1, t, torch.full_like(lse, -1.0))  # softmax - onehot
            if need_features:
                grad_features[rows] = grad_logits @ table
            if need_table:
                grad_table.addmm_(grad_logits.T, x)
            if need_bias:
                grad_bias += grad_logits.sum(0)
        ctx.save_for_backward(grad_features, grad_table, grad_bias)
        return total

    @staticmethod
    def backward(ctx, grad_total):  # noqa: ANN001, ANN205
        scaled = [None if g is None else g * grad_total for g in ctx.saved_tensors]
        return *scaled, None, None


def linear_cross_entropy(
    features: torch.Tensor, table: torch.Tensor, bias: torch.Tensor, targets: torch.Tensor, chunk_rows: int = 256
) -> torch.Tensor:
    """The summed cross-entropy of the logits ``features @ table.T + bias`` against ``targets``, without holding
    the logits: features (N, C), table (K, C), bias (K,), targets (N,) long -> a scalar. Same value and gradients as
    ``F.cross_entropy(features @ table.T + bias, targets, reduction="sum")`` (tests/mllm/test_model.py). Computed in
    float32 whatever the inputs' dtypes and an enclosing autocast (bf16 features and a float32 table, say)."""
    with torch.autocast(features.device.type, enabled=False):
        return _LinearCrossEntropy.apply(features.float(), table.float(), bias.float(), targets, chunk_rows)


class DepthBlock(nn.Module):
    """Pre-LN causal self-attention + GELU MLP, with residual dropout."""

    def __init__(self, width: int, num_heads: int, mlp_ratio: float, dropout: float) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.norm1 = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.norm2 = nn.LayerNorm(width)
        self.mlp = two_layer_mlp(width, int(width * mlp_ratio), width)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, width = x.shape
        qkv = self.qkv(self.norm1(x)).view(batch, length, 3, self.num_heads, width // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each (B, heads, d, head_dim)
        attended = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.dropout(self.proj(attended.transpose(1, 2).reshape(batch, length, width)))
        return x + self.dropout(self.mlp(self.norm2(x)))


class DepthTransformer(nn.Module):
    """One vocabulary's head: gen projector, depth transformer, a classifier per depth."""

    def __init__(
        self, llm_width: int, code_dim: int, codebook_size: int, depth: int, config: DepthHeadConfig
    ) -> None:
        super().__init__()
        width = config.width or llm_width
        if width % config.num_heads:
            raise ConfigError(
                f"visual head width {width} is not a multiple of heads.num_heads {config.num_heads}"
            )
        self.depth = depth
        self.gen_projector = two_layer_mlp(llm_width, width, width)
        self.code_in = nn.Linear(code_dim, width)
        self.depth_embedding = nn.Parameter(torch.randn(depth, width) * 0.02)
        self.blocks = nn.ModuleList(
            DepthBlock(width, config.num_heads, config.mlp_ratio, config.dropout)
            for _ in range(config.layers)
        )
        self.norm = nn.LayerNorm(width)
        self.tied = config.classifier == "code_table"
        rows = code_dim if self.tied else codebook_size  # per depth: into code space, or one row per code
        self.classifier_weight = nn.Parameter(torch.randn(depth, rows, width) * width**-0.5)
        self.classifier_bias = nn.Parameter(torch.zeros(depth, codebook_size))

    def _code_space(
        self, x: torch.Tensor, depth: int, codebook: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """States (M, width) at one depth -> (features (M, C), table (K, C)): logits = features @ table.T + bias."""
        weight = self.classifier_weight[depth]  # (rows, width)
        if not self.tied:
            return x, weight
        if codebook is None:
            raise ConfigError("a code_table classifier needs the code vectors (codebook=)")
        table = codebook[depth] if codebook.dim() == 3 else codebook  # one codebook per depth (Q, K, C), or shared
        return x @ weight.T, table.float()

    def _classify(self, x: torch.Tensor, first: int, codebook: torch.Tensor | None) -> torch.Tensor:
        """States (M, d, width) of depths first+1..first+d -> logits (M, d, K)."""
        logits = []
        for step in range(x.shape[1]):
            features, table = self._code_space(x[:, step], first + step, codebook)
            logits.append(torch.addmm(self.classifier_bias[first + step], features, table.T))  # (M, K)
        return torch.stack(logits, dim=1)

    def _states(self, hidden: torch.Tensor, previous: torch.Tensor) -> torch.Tensor:
        """The depth transformer's output (M, d, width) at depths 1..d, d = previous.shape[1] + 1."""
        steps = previous.shape[1] + 1
        first = self.gen_projector(hidden.float()).unsqueeze(1)  # (M, 1, width)
        rest = self.code_in(previous.float().cumsum(dim=1))  # (M, d-1, width)
        x = torch.cat([first, rest], dim=1) + self.depth_embedding[:steps]
        for block in self.blocks:
            x = block(x)
        return self.norm(x)

    def forward(
        self,
        hidden: torch.Tensor,
        previous: torch.Tensor,
        last_only: bool = False,
        codebook: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits (M, d, K) of depths 1..d, given LLM states ``hidden`` (M, llm_width) and the code vectors of
        depths 1..d-1, ``previous`` (M, d-1, code_dim), 0 <= d-1 < Q. Sampling asks for depth d only
        (``last_only``: logits (M, K)). ``codebook`` (K, code_dim), or (Q, K, code_dim) with one codebook per depth:
        the code vectors a ``code_table`` classifier scores against. Training uses :meth:`losses` instead."""
        x = self._states(hidden, previous)
        if last_only:
            return self._classify(x[:, -1:], x.shape[1] - 1, codebook)[:, 0]
        return self._classify(x, 0, codebook)

    def losses(
        self, hidden: torch.Tensor, codes: torch.Tensor, vectors: torch.Tensor, codebook: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Teacher-forced cross-entropy of every depth, summed over the M rows: (Q,). ``codes`` (M, Q) are the
        targets, ``vectors`` (M, Q-1, code_dim) the code vectors of depths 1..Q-1; no (M, Q, K) logits are held."""
        x = self._states(hidden, vectors)  # (M, Q, width)
        per_depth = []
        for depth in range(x.shape[1]):
            features, table = self._code_space(x[:, depth], depth, codebook)
            per_depth.append(linear_cross_entropy(features, table, self.classifier_bias[depth], codes[:, depth]))
        return torch.stack(per_depth)
