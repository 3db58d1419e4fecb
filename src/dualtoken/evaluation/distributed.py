"""Evaluation under torchrun: which images a process takes, and how per-image results come back in data order.

Image i goes to process i mod world_size. Per-image rows travel with their data index, so after gathering they
are sorted back into data order and every set-level number is computed on exactly what one process would see.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from ..process_group import gather_objects, in_process_group


def rank_and_world() -> tuple[int, int]:
    if not in_process_group():
        return 0, 1
    return dist.get_rank(), dist.get_world_size()


def gather_rows(indices: torch.Tensor, rows: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-image rows (first dimension = the images of ``indices``) of all processes, sorted by data index."""
    parts = gather_objects((indices.cpu(), {name: value.cpu() for name, value in rows.items()}))
    all_indices = torch.cat([part[0] for part in parts])
    order = torch.argsort(all_indices)
    merged = {name: torch.cat([part[1][name] for part in parts])[order] for name in rows}
    return all_indices[order], merged


def sum_over_processes(tensor: torch.Tensor) -> torch.Tensor:
    """Element-wise sum over processes (exact for integer counts)."""
    if not in_process_group():
        return tensor
    return sum(part for part in gather_objects(tensor.cpu()))
