"""Processes and devices: one process, or torchrun (DDP / FSDP2) across processes and nodes.

Under torchrun (``WORLD_SIZE`` > 1) the process group is joined here (:func:`dualtoken.process_group.join_process_group`:
NCCL on CUDA, gloo on CPU) unless the caller already made one. State dicts are gathered to full tensors on rank 0 for checkpoints, and loaded back on
every rank, for DDP and FSDP alike.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from ..errors import ConfigError
from ..process_group import join_process_group


@dataclass
class Runtime:
    """This process's place: rank, world size, device, and whether the process group was made here."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    owns_group: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def close(self) -> None:
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()


def setup_runtime(device: str = "auto") -> Runtime:
    """Read torchrun's environment (or an existing process group) and pick this process's device."""
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if device == "auto":
        device = f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
    target = torch.device(device)
    if target.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device {device!r} asked for, but CUDA is not available")
        torch.cuda.set_device(target)
    owns = join_process_group(target)
    if dist.is_initialized():
        return Runtime(dist.get_rank(), dist.get_world_size(), local_rank, target, owns)
    return Runtime(0, 1, local_rank, target)


def wrap_model(model: nn.Module, runtime: Runtime, parallel: str, find_unused: bool) -> nn.Module:
    """DDP (buffers not broadcast: the quantizers synchronise their own) or FSDP2 ``fully_shard`` per tower
    layer and decoder ResNet block, then the root. One process: the model itself."""
    if not runtime.distributed:
        return model
    if parallel == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        device_ids = [runtime.device] if runtime.device.type == "cuda" else None
        return DistributedDataParallel(
            model, device_ids=device_ids, broadcast_buffers=False, find_unused_parameters=find_unused
        )
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from ..decoder import ResnetBlock

    mesh = init_device_mesh(runtime.device.type, (runtime.world_size,))
    for key, part in model.backbone.parts().items():
        if isinstance(key, int) and key > 0:
            fully_shard(part, mesh=mesh)
    for module in model.decoder.modules():
        if isinstance(module, ResnetBlock):
            fully_shard(module, mesh=mesh)
    fully_shard(model, mesh=mesh)  # the root keeps decoder.conv_out unsharded between forward and backward
    return model


def gradient_sync(model: nn.Module, enabled: bool) -> contextlib.AbstractContextManager:
    """Around one micro-step's backward: with ``enabled`` False, skip the gradient all-reduce (DDP ``no_sync``;
    FSDP2 ``set_requires_gradient_sync(False)``, restored on exit). Gradient accumulation syncs only on its last
    micro-step. A module that is neither (one process) needs nothing."""
    if enabled:
        return contextlib.nullcontext()
    if hasattr(model, "no_sync"):
        return model.no_sync()
    if hasattr(model, "set_requires_gradient_sync"):
        return _fsdp_sync_off(model)
    return contextlib.nullcontext()


@contextlib.contextmanager
def _fsdp_sync_off(model: nn.Module):
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


def unwrap(model: nn.Module) -> nn.Module:
    """The tokenizer inside a DDP wrapper (FSDP2 shards in place: the model is the tokenizer)."""
    return model.module if hasattr(model, "module") else model


def _state_options():
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=True)


def full_model_state(model: nn.Module, parallel: str, runtime: Runtime) -> dict[str, torch.Tensor]:
    """The tokenizer's full state dict (CPU) on rank 0 (an empty dict elsewhere under FSDP)."""
    if runtime.distributed and parallel == "fsdp":
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        return get_model_state_dict(model, options=_state_options())
    return {k: v.detach().cpu() for k, v in unwrap(model).state_dict().items()}


def full_optimizer_state(
    model: nn.Module, optimizer: torch.optim.Optimizer, parallel: str, runtime: Runtime
) -> dict:
    if runtime.distributed and parallel == "fsdp":
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        return get_optimizer_state_dict(model, optimizer, options=_state_options())
    return optimizer.state_dict()


def load_model_state(model: nn.Module, state: dict, parallel: str, runtime: Runtime) -> None:
    if runtime.distributed and parallel == "fsdp":
        from torch.distributed.checkpoint.state_dict import set_model_state_dict

        set_model_state_dict(model, state, options=_state_options())
        return
    unwrap(model).load_state_dict(state)


def load_optimizer_state(
    model: nn.Module, optimizer: torch.optim.Optimizer, state: dict, parallel: str, runtime: Runtime
) -> None:
    if runtime.distributed and parallel == "fsdp":
        from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

        set_optimizer_state_dict(model, optimizer, state, options=_state_options())
        return
    optimizer.load_state_dict(state)
