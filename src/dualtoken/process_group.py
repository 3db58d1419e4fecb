"""The process group of torchrun: the one way to join it (training, evaluation and pre-tokenization all call
:func:`join_process_group`) and the object collectives they share (identities outside a group)."""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.distributed as dist


def join_process_group(device: torch.device | None = None) -> bool:
    """Join the process group of torchrun's environment (``WORLD_SIZE`` > 1) unless this process is in one already:
    NCCL when the process computes on a CUDA device (``device``; None: ``cuda:LOCAL_RANK`` when CUDA is available),
    gloo otherwise. Returns whether this call made the group (and so should destroy it)."""
    if not dist.is_available() or dist.is_initialized() or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    if device is None:
        local = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
        device = torch.device(local if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return True


def in_process_group() -> bool:
    return dist.is_available() and dist.is_initialized()


def gather_objects(obj: Any) -> list[Any]:
    """Every process's ``obj`` in rank order, on every process (a one-item list outside a group)."""
    if not in_process_group():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any) -> Any:
    """Rank 0's ``obj`` on every process."""
    if not in_process_group():
        return obj
    holder = [obj]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]
