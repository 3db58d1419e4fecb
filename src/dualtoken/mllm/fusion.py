"""Understanding input (docs/METHOD.md "Understanding input"): both code stacks of a grid position -> one LLM input vector.

    e_pix = Σ_d E_pix[c_pix,d],  e_sem = Σ_d E_sem[c_sem,d]         (code tables start as the tokenizer's codebooks)
    per_branch:   concat(MLP_pix(e_pix), MLP_sem(e_sem))             (each MLP to half the LLM width)
    concat_first: MLP(concat(e_pix, e_sem))
The sequence length stays h·w per image: the two vocabularies share a position.
"""

from __future__ import annotations

import torch
from torch import nn

from .config import FusionConfig

BRANCHES = ("pixel", "semantic")


def two_layer_mlp(in_width: int, hidden_width: int, out_width: int) -> nn.Sequential:
    """Linear -> GELU -> Linear (the projector shape of the paper)."""
    return nn.Sequential(nn.Linear(in_width, hidden_width), nn.GELU(), nn.Linear(hidden_width, out_width))


class CodeTables(nn.Module):
    """The MLLM's own embedding tables of both vocabularies, initialised from the tokenizer's codebooks.

    A vocabulary with one codebook per depth (``codebook_sharing: per_depth``, codebooks (Q, K, D)) keeps its Q
    tables stacked as one (Q·K, D) table: code c at depth d is row d·K + c."""

    def __init__(
        self, pixel_codebook: torch.Tensor, semantic_codebook: torch.Tensor, trainable: bool
    ) -> None:
        super().__init__()
        self.per_depth_rows: dict[str, int] = {}  # K of a per-depth vocabulary (its depth offset); 0 when shared
        for branch, codebook in zip(BRANCHES, (pixel_codebook, semantic_codebook), strict=True):
            vectors = codebook.detach().clone().float()  # (K, D) or (Q, K, D)
            self.per_depth_rows[branch] = vectors.shape[1] if vectors.dim() == 3 else 0
            self.add_module(branch, nn.Embedding.from_pretrained(vectors.flatten(0, -2), freeze=not trainable))

    def codebook(self, branch: str) -> torch.Tensor:
        """The table's current code vectors: (K, D), or (Q, K, D) for a per-depth vocabulary."""
        weight = getattr(self, branch).weight
        rows = self.per_depth_rows[branch]
        return weight.view(-1, rows, weight.shape[1]) if rows else weight

    def vectors(self, codes: torch.Tensor, branch: str, first_depth: int = 0) -> torch.Tensor:
        """Codes (..., q) of depths first_depth+1..first_depth+q -> code vectors (..., q, D)."""
        rows = self.per_depth_rows[branch]
        if rows:
            depths = torch.arange(first_depth, first_depth + codes.shape[-1], device=codes.device)
            codes = codes + depths * rows
        return getattr(self, branch)(codes)

    def sums(self, codes: torch.Tensor, branch: str) -> torch.Tensor:
        """Codes (..., Q) -> the residual reconstruction Σ_d E_d[c_d] (..., D)."""
        return self.vectors(codes, branch).sum(dim=-2)


class VisualInputFusion(nn.Module):
    """Summed code embeddings of the configured vocabularies -> (..., llm_width)."""

    def __init__(self, config: FusionConfig, code_dims: dict[str, int], llm_width: int) -> None:
        super().__init__()
        self.branches = BRANCHES if config.inputs == "both" else (config.inputs,)
        self.order = config.order if len(self.branches) == 2 else "concat_first"
        if self.order == "per_branch":
            halves = {"pixel": llm_width // 2, "semantic": llm_width - llm_width // 2}
            self.mlps = nn.ModuleDict(
                {
                    b: two_layer_mlp(code_dims[b], config.hidden_width or halves[b], halves[b])
                    for b in self.branches
                }
            )
        else:
            in_width = sum(code_dims[b] for b in self.branches)
            self.mlp = two_layer_mlp(in_width, config.hidden_width or llm_width, llm_width)

    def forward(self, sums: dict[str, torch.Tensor]) -> torch.Tensor:
        """``sums[branch]``: (..., D_branch) code sums; the branches not used as input are ignored."""
        if self.order == "per_branch":
            return torch.cat([self.mlps[b](sums[b]) for b in self.branches], dim=-1)
        return self.mlp(torch.cat([sums[b] for b in self.branches], dim=-1))
