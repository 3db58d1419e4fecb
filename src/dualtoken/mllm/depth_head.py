"""A visual head (docs/METHOD.md "Generation"): the LLM state at a visual position -> the Q residual codes of one vocabulary.

Depth inputs: I_1 = gen_projector(h); I_d = W_in·Σ_{d'<d} E[c_d'] for d > 1 (the partial residual
reconstruction), plus a learned depth embedding. A causal transformer over the Q depths, a final LayerNorm and
one classifier per depth give the logits of code d from I_1..I_d: its own K x width weights (``per_depth``), or
(``code_table``) a map of the state into code space scored against the K code vectors, l_k = <P_d x, e_k> + b_k.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from .config import DepthHeadConfig
from .fusion import two_layer_mlp


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

    def _classify(self, x: torch.Tensor, first: int, codebook: torch.Tensor | None) -> torch.Tensor:
        """States (M, d, width) of depths first+1..first+d -> logits (M, d, K)."""
        weight = self.classifier_weight[first : first + x.shape[1]]  # (d, rows, width)
        bias = self.classifier_bias[first : first + x.shape[1]]  # (d, K)
        scores = torch.einsum("mdw,drw->mdr", x, weight)  # (M, d, K), or (M, d, code_dim) when tied
        if self.tied:
            if codebook is None:
                raise ConfigError("a code_table classifier needs the code vectors (codebook=)")
            if codebook.dim() == 3:  # one codebook per depth (Q, K, code_dim)
                scores = torch.einsum("mdc,dkc->mdk", scores, codebook[first : first + x.shape[1]].float())
            else:
                scores = scores @ codebook.float().T  # (M, d, K)
        return scores + bias

    def forward(
        self,
        hidden: torch.Tensor,
        previous: torch.Tensor,
        last_only: bool = False,
        codebook: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits (M, d, K) of depths 1..d, given LLM states ``hidden`` (M, llm_width) and the code vectors of
        depths 1..d-1, ``previous`` (M, d-1, code_dim), 0 <= d-1 < Q. Teacher forcing passes all Q-1; sampling
        asks for depth d only (``last_only``: logits (M, K)). ``codebook`` (K, code_dim), or (Q, K, code_dim) with one
        codebook per depth: the code vectors a ``code_table`` classifier scores against."""
        steps = previous.shape[1] + 1
        first = self.gen_projector(hidden.float()).unsqueeze(1)  # (M, 1, width)
        rest = self.code_in(previous.float().cumsum(dim=1))  # (M, d-1, width)
        x = torch.cat([first, rest], dim=1) + self.depth_embedding[:steps]
        for block in self.blocks:
            x = block(x)
        x = self.norm(x)
        if last_only:
            return self._classify(x[:, -1:], steps - 1, codebook)[:, 0]
        return self._classify(x, 0, codebook)
