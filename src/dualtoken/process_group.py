"""The one way a process joins the group torchrun describes: training, evaluation and pre-tokenization all call
:func:`join_process_group`."""

from __future__ import annotations

import os

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
