"""AttnProjection: the attention + GeGLU block that moves token features between the tower width and the code width.

Down (W -> D) attends over all tokens and averages the heads; up (D -> W) is causal in raster order and concatenates
the heads. Both use heads of width D, so there are max(W, D) / D of them (docs/METHOD.md "Projections").
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import ProjectionConfig
from .errors import ConfigError


class GeGLU(nn.Module):
    """``w2(gelu_tanh(w0(LN(x))) * w1(LN(x)))`` with hidden width ``ratio * dim``."""

    def __init__(self, dim: int, ratio: int, norm_eps: float) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=norm_eps)
        self.w0 = nn.Linear(dim, ratio * dim)
        self.w1 = nn.Linear(dim, ratio * dim)
        self.w2 = nn.Linear(ratio * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(x)
        return self.w2(F.gelu(self.w0(x), approximate="tanh") * self.w1(x))


class ProjectionAttention(nn.Module):
    """Multi-head attention with heads of width ``head_dim``; keys carry no bias (a zero buffer stands in)."""

    def __init__(self, in_dim: int, out_dim: int, head_dim: int) -> None:
        super().__init__()
        inner = max(in_dim, out_dim)
        if inner % head_dim:
            raise ConfigError(f"projection width {inner} is not a multiple of the code dimension {head_dim}")
        self.head_dim = head_dim
        self.num_heads = inner // head_dim
        self.reduce = in_dim > out_dim  # down: average heads, non-causal; up: concatenate heads, causal
        self.qkv = nn.Linear(in_dim, 3 * inner, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(inner))
        self.v_bias = nn.Parameter(torch.zeros(inner))
        self.register_buffer("zero_k_bias", torch.zeros(inner))
        self.proj = nn.Linear(out_dim, out_dim)
        self.out_dim = out_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, _ = x.shape
        bias = torch.cat([self.q_bias, self.zero_k_bias, self.v_bias])
        qkv = F.linear(x, self.qkv.weight, bias)  # (B, T, 3 * heads * head_dim)
        q, k, v = qkv.view(batch, tokens, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=not self.reduce)  # (B, heads, T, head_dim)
        if self.reduce:
            out = out.mean(dim=1)  # (B, T, head_dim)
            if out.shape[-1] != self.out_dim:
                out = F.adaptive_avg_pool1d(out, self.out_dim)
        else:
            out = out.transpose(1, 2).reshape(batch, tokens, -1)  # (B, T, heads * head_dim)
        return self.proj(out)


class AttnProjection(nn.Module):
    """``y = proj(norm3(x)) + attn(norm1(x)); z = y + mlp(norm2(y))``: tokens (B, T, in_dim) -> (B, T, out_dim)."""

    def __init__(self, in_dim: int, out_dim: int, head_dim: int, config: ProjectionConfig) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(in_dim, eps=config.norm_eps)
        self.norm3 = nn.LayerNorm(in_dim, eps=config.norm_eps)
        self.norm2 = nn.LayerNorm(out_dim, eps=config.norm_eps)
        self.proj = nn.Linear(in_dim, out_dim)
        self.attn = ProjectionAttention(in_dim, out_dim, head_dim)
        self.mlp = GeGLU(out_dim, config.mlp_ratio, config.mlp_norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.proj(self.norm3(x)) + self.attn(self.norm1(x))
        return y + self.mlp(self.norm2(y))
