"""Two processes under torchrun (gloo, CPU): DDP keeps ranks identical, matches one process with the same global
batch, and resumes exactly."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dualtoken import DualTokenizer
from dualtoken.training import tokenizer_engine
from dualtoken.training.distributed import unwrap

from .conftest import tiny_config, train_records

pytestmark = [pytest.mark.slow, pytest.mark.distributed]

# runs the given (config file, stop step) jobs one after another in each of the two processes; a job that
# continues an earlier job's output folder resumes from its checkpoint like a fresh launch would
WORKER = """
import gc, json, sys, torch, torch.distributed as dist
from dualtoken.training import load_train_config, tokenizer_engine
from dualtoken.training.distributed import full_model_state
torch.set_num_threads(1)
dist.init_process_group("gloo")
for config_path, out, stop in json.loads(sys.argv[1]):
    trainer = tokenizer_engine(load_train_config(config_path))
    trainer.fit(stop_at=stop or None)
    state = full_model_state(trainer.model, trainer.config.parallel, trainer.runtime)  # FSDP: rank 0 only
    if state:
        torch.save(state, f"{out}/rank{trainer.runtime.rank}-step{trainer.step}.pt")
    trainer.close()
    del trainer, state
gc.collect()  # the wrapped models hold the process group: release them before it is destroyed
dist.barrier()  # no rank tears the group down while another is still in a collective
dist.destroy_process_group()
"""

# no dead-code restarts (their random vectors come from rank 0's batch only) and no GAN (its adaptive weight is
# computed per rank): everything else must be the same whether the global batch sits in one process or two.
# Adam's eps is raised so that gradients that are zero up to rounding (the attention key biases) are not
# amplified into full-size steps whose sign depends on the summation order.
EQUIVALENT = (
    "optimizer.eps=1e-4",
    'model_overrides=["pixel_quantizer.restart_unused_codes=false", "semantic_quantizer.restart_unused_codes=false"]',
    "loss.gan.enabled=false",
    "max_steps=3",
)


def torchrun(tmp_path: Path, *jobs: tuple) -> None:
    """Launch the worker under torchrun with jobs (config, output folder for the weights, stop step or 0)."""
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    specs = []
    for index, (config, out, stop) in enumerate(jobs):
        config_path = tmp_path / f"config-{index}.json"
        config_path.write_text(config.to_json())
        Path(out).mkdir(parents=True, exist_ok=True)
        specs.append([str(config_path), str(out), stop])
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    command += [str(script), json.dumps(specs)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]


def _load(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)


def test_two_ranks_stay_identical_and_match_one_process(tmp_path: Path, train_images: Path):
    torchrun(
        tmp_path, (tiny_config(tmp_path / "ddp", train_images, *EQUIVALENT, "data.batch_size=2"), tmp_path, 0)
    )
    rank0, rank1 = _load(tmp_path / "rank0-step3.pt"), _load(tmp_path / "rank1-step3.pt")
    for name in rank0:
        assert torch.equal(rank0[name], rank1[name]), name

    single = tokenizer_engine(tiny_config(tmp_path / "single", train_images, *EQUIVALENT, "data.batch_size=4"))
    single.fit()
    alone = unwrap(single.model).state_dict()
    for name in rank0:
        torch.testing.assert_close(rank0[name], alone[name], rtol=1e-3, atol=1e-4, msg=name)
    codebooks = [n for n in rank0 if n.endswith("codebook")]
    assert len(codebooks) == 2
    ddp_loss = [r["loss"] for r in train_records(tmp_path / "ddp")]
    single_loss = [r["loss"] for r in train_records(tmp_path / "single")]
    assert ddp_loss == pytest.approx(single_loss, rel=1e-4)


def test_fsdp_matches_one_process_and_exports(tmp_path: Path, train_images: Path):
    config = tiny_config(tmp_path / "fsdp", train_images, *EQUIVALENT, "data.batch_size=2", "parallel=fsdp")
    torchrun(tmp_path, (config, tmp_path, 0))
    sharded = _load(tmp_path / "rank0-step3.pt")
    assert not (tmp_path / "rank1-step3.pt").exists()
    single = tokenizer_engine(tiny_config(tmp_path / "single", train_images, *EQUIVALENT, "data.batch_size=4"))
    single.fit()
    alone = unwrap(single.model).state_dict()
    assert sharded.keys() == alone.keys()
    for name in alone:
        torch.testing.assert_close(sharded[name], alone[name], rtol=1e-3, atol=1e-4, msg=name)
    exported = DualTokenizer.from_pretrained(tmp_path / "fsdp" / "final").state_dict()
    for name in alone:
        assert torch.equal(exported[name], sharded[name]), name


TASKS = {
    "tokenizer": ("loss.gan.restart_every=1",),
    "pixel": ("branch=pixel", "teacher=none", "loss.semantic_weight=0", "freeze.preset=stage0", "loss.gan.enabled=false"),
    "semantic": ("branch=semantic", "freeze.preset=stage0", "loss.pooled_kl=1.0", "cache.crops_per_image=2"),
}


@pytest.mark.parametrize("task", TASKS)
def test_two_rank_resume_equals_uninterrupted(tmp_path: Path, train_images: Path, task: str):
    extra = ("max_steps=4", *TASKS[task])
    straight = tiny_config(tmp_path / "a" / "run", train_images, *extra)
    interrupted = tiny_config(tmp_path / "b" / "run", train_images, *extra)
    torchrun(
        tmp_path,
        (straight, tmp_path / "a", 0),
        (interrupted, tmp_path / "b", 2),
        (interrupted, tmp_path / "b", 0),
    )
    assert (tmp_path / "b" / "rank1-step2.pt").is_file()  # the interrupted job did stop at step 2
    for rank in (0, 1):
        straight = _load(tmp_path / "a" / f"rank{rank}-step4.pt")
        resumed = _load(tmp_path / "b" / f"rank{rank}-step4.pt")
        for name in straight:
            torch.testing.assert_close(resumed[name], straight[name], rtol=1e-5, atol=1e-6, msg=name)
    losses_a = [r["loss"] for r in train_records(tmp_path / "a" / "run")]
    losses_b = [r["loss"] for r in train_records(tmp_path / "b" / "run")]
    assert len(losses_b) == 4 and losses_b == pytest.approx(losses_a, rel=1e-5)
    assert ("disc_hinge" in train_records(tmp_path / "b" / "run")[-1]) == (task == "tokenizer")
