"""EMA statistics agree across processes (gloo) and dead-code restarts are identical on every rank."""

import subprocess
import sys
import textwrap

import pytest
import torch

SCRIPT = textwrap.dedent(
    """
    import os, sys, torch, torch.distributed as dist, torch.multiprocessing as mp
    from dualtoken.config import QuantizerConfig
    from dualtoken.quantizer import ResidualQuantizer

    def make(restart, schedule):
        torch.manual_seed(0)
        return ResidualQuantizer(QuantizerConfig(codebook_size=64, code_dim=4, depth=3, ema_schedule=schedule,
                                                 restart_unused_codes=restart)).train()

    def data():
        return torch.randn(2, 40, 4, generator=torch.Generator().manual_seed(1))

    def worker(rank, out, port):
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("gloo", rank=rank, world_size=2)
        torch.set_num_threads(1)
        torch.manual_seed(100 + rank)  # ranks draw different random numbers: the broadcast must align them
        result = {}
        for restart in (False, True):
            for schedule in ("per_depth", "per_step"):
                q = make(restart, schedule)
                for _ in range(3):
                    q(data()[rank])
                result[f"{restart}-{schedule}"] = {k: v.clone() for k, v in q.state_dict().items()}
        torch.save(result, f"{out}/rank{rank}.pt")
        dist.barrier()  # tear the group down together
        dist.destroy_process_group()

    if __name__ == "__main__":
        out, port = sys.argv[1], int(sys.argv[2])
        mp.spawn(worker, args=(out, port), nprocs=2)
        single = {}
        for schedule in ("per_depth", "per_step"):
            q = make(False, schedule)
            for _ in range(3):
                q(data().reshape(80, 4))
            single[schedule] = {k: v.clone() for k, v in q.state_dict().items()}
        torch.save(single, f"{out}/single.pt")
    """
)


@pytest.mark.distributed
def test_two_process_ema_and_restarts(tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    script = tmp_path / "run.py"
    script.write_text(SCRIPT)
    result = subprocess.run([sys.executable, str(script), str(tmp_path), str(port)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    rank0, rank1 = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    single = torch.load(tmp_path / "single.pt")
    for key in rank0:
        for name in rank0[key]:
            assert torch.equal(rank0[key][name], rank1[key][name]), (key, name)  # identical on every rank
    # with restarts off, two ranks with half the batch each equal one process with the whole batch
    for schedule in ("per_depth", "per_step"):
        for name, value in single[schedule].items():
            torch.testing.assert_close(rank0[f"False-{schedule}"][name], value, atol=1e-5, rtol=1e-5)
