"""Gradient accumulation across two processes (gloo, CPU): ``gradient_sync`` reduces gradients on the last
micro-step only, under DDP and FSDP2, and the accumulated gradient equals one process's on the whole batch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.distributed]

# each rank accumulates 3 micro-batches of its own data, once with gradient_sync(model, last) (as both trainers
# do) and once syncing on every micro-step; it counts the gradient collectives of each and compares the result
# with the gradient of the whole global batch computed in one process
WORKER = """
import gc, json, sys, torch, torch.distributed as dist
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
from dualtoken.training.distributed import gradient_sync
torch.set_num_threads(1)
dist.init_process_group("gloo")
rank, micro_steps = dist.get_rank(), 3
collectives = {"n": 0}
for name in ("all_reduce", "reduce_scatter_tensor", "reduce_scatter_single", "reduce_scatter"):
    if hasattr(dist, name):
        original = getattr(dist, name)
        def counted(*args, _original=original, **kwargs):
            collectives["n"] += 1
            return _original(*args, **kwargs)
        setattr(dist, name, counted)

def network():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4))

data = torch.randn(2, micro_steps, 5, 8, generator=torch.Generator().manual_seed(1))  # (rank, micro, batch, x)

def loss(model, x):
    return model(x).pow(2).mean() / micro_steps

reference = network()
for micro in range(micro_steps):
    (loss(reference, data[0, micro]) + loss(reference, data[1, micro])).div(2).backward()
expected = [p.grad for p in reference.parameters()]

def wrapped(parallel):
    model = network()
    if parallel == "ddp":
        from torch.nn.parallel import DistributedDataParallel
        model = DistributedDataParallel(model)
        model.register_comm_hook(None, _count_ddp)
        return model
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    mesh = init_device_mesh("cpu", (2,))
    fully_shard(model[0], mesh=mesh)
    return fully_shard(model, mesh=mesh)

def _count_ddp(state, bucket):
    collectives["n"] += 1
    return allreduce_hook(state, bucket)

results = {}
for parallel in ("ddp", "fsdp"):
    for mode in ("last", "every"):
        model = wrapped(parallel)
        collectives["n"] = 0
        for micro in range(micro_steps):
            with gradient_sync(model, mode == "every" or micro == micro_steps - 1):
                loss(model, data[rank, micro]).backward()
        count = collectives["n"]
        grads = [p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad for p in model.parameters()]
        match = all(torch.allclose(g, e, atol=1e-6) for g, e in zip(grads, expected))
        results[f"{parallel}/{mode}"] = {"collectives": count, "matches_one_process": match}
if rank == 0:
    with open(sys.argv[1], "w") as handle:
        handle.write(json.dumps(results))
# a clean exit: release the wrapped models (they hold the group), then tear it down together, none in flight
del model
gc.collect()
dist.barrier()
dist.destroy_process_group()
"""


def test_accumulation_syncs_on_the_last_micro_step_only(tmp_path: Path):
    script, out = tmp_path / "worker.py", tmp_path / "results.json"
    script.write_text(WORKER)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(script), str(out)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(out.read_text())
    for parallel in ("ddp", "fsdp"):
        last, every = results[f"{parallel}/last"], results[f"{parallel}/every"]
        assert last["matches_one_process"] and every["matches_one_process"], results
        assert last["collectives"] >= 1 and every["collectives"] == 3 * last["collectives"], results
