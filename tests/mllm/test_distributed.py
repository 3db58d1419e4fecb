"""torchrun-style training on 2 gloo processes: DDP keeps the ranks identical, FSDP2 trains the same model."""

from __future__ import annotations

import dataclasses
import json
import socket
import subprocess
import sys
import textwrap

import pytest
import torch

from dualtoken.config import to_dict
from dualtoken.mllm import DualTokenMLLM, MLLMDataConfig, MLLMTrainConfig
from dualtoken.tokenfile import save_tokens
from dualtoken.training.config import CheckpointConfig, LogConfig, OptimizerConfig

SCRIPT = textwrap.dedent(
    """
    import os, sys, torch, torch.distributed as dist, torch.multiprocessing as mp

    def worker(rank, folder, port):
        import gc
        import json
        from dualtoken.config import from_dict
        from dualtoken.mllm import MLLMTrainConfig
        from dualtoken.mllm.train import mllm_engine
        from dualtoken.training.distributed import unwrap

        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2", RANK=str(rank))
        dist.init_process_group("gloo", rank=rank, world_size=2)
        torch.set_num_threads(1)
        for parallel in ("ddp", "fsdp"):
            config = from_dict(MLLMTrainConfig, json.loads(open(f"{folder}/train.json").read()))
            config.parallel = parallel
            config.output_dir = f"{folder}/{parallel}"
            config.log.progress = False
            engine = mllm_engine(config, folder)
            engine.fit()
            if parallel == "ddp":
                state = {k: v.detach().clone() for k, v in unwrap(engine.model).state_dict().items()}
                torch.save(state, f"{folder}/ddp-rank{rank}.pt")
            del engine
        gc.collect()  # release the wrapped models, which hold the group, then tear it down together
        dist.barrier()
        dist.destroy_process_group()

    if __name__ == "__main__":
        mp.spawn(worker, args=(sys.argv[1], int(sys.argv[2])), nprocs=2)
    """
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.distributed
def test_ddp_ranks_agree_and_fsdp_trains_the_same_model(tmp_path, tiny_tokenizer, tiny_codes, mllm_config):
    tiny_tokenizer.save_pretrained(tmp_path / "tokenizer")
    ids = ["a.png", "b.png"]
    save_tokens(
        tmp_path / "cache.safetensors", tiny_codes.pixel, tiny_codes.semantic, ids, "tiny", (256, 256)
    )
    (tmp_path / "conversations.json").write_text(
        json.dumps(
            [
                {
                    "image": name,
                    "conversations": [
                        {"from": "human", "value": "<image>\nWhat?"},
                        {"from": "gpt", "value": f"A {label}."},
                    ],
                }
                for name, label in zip(ids, ("cat", "dog"))
            ]
        )
    )
    (tmp_path / "captions.jsonl").write_text(
        "".join(json.dumps({"file": n, "caption": "Draw."}) + "\n" for n in ids)
    )
    config = MLLMTrainConfig(
        model=dataclasses.replace(mllm_config, tokenizer="tokenizer"),
        data=MLLMDataConfig(
            token_cache=("cache.safetensors",),
            conversations=("conversations.json",),
            captions=("captions.jsonl",),
            condition_dropout=0.0,
            batch_size=1,
        ),
        optimizer=OptimizerConfig(lr=3e-3, betas=(0.9, 0.999), weight_decay=0.0, warmup_steps=1, grad_clip=1.0),
        max_steps=3,
        checkpoint=CheckpointConfig(every=2, keep_last=2),
        log=LogConfig(every=1, console=False, tensorboard=False),
    )
    (tmp_path / "train.json").write_text(json.dumps(to_dict(config)))
    script = tmp_path / "run.py"
    script.write_text(SCRIPT)
    done = subprocess.run(
        [sys.executable, str(script), str(tmp_path), str(_free_port())],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"ddp-rank{r}.pt") for r in (0, 1)]
    for name, value in ranks[0].items():
        assert value.equal(ranks[1][name]), name
    ddp = DualTokenMLLM.from_pretrained(tmp_path / "ddp" / "final").state_dict()
    fsdp = DualTokenMLLM.from_pretrained(tmp_path / "fsdp" / "final").state_dict()
    torch.manual_seed(config.seed)
    initial = DualTokenMLLM.from_config(config.model, base_dir=tmp_path).state_dict()
    for name, value in ddp.items():
        assert value.equal(ranks[0][name]), name  # the export is the ranks' model
        torch.testing.assert_close(fsdp[name], value, atol=2e-5, rtol=1e-4, msg=name)
    trained = [n for n in ddp if not ddp[n].equal(initial[n])]
    assert any(n.startswith("fusion.") for n in trained) and any(n.startswith("llm.") for n in trained)
    assert all(n.startswith(("fusion.", "llm.", "pixel_head.", "semantic_head.")) for n in trained)
    steps = [
        json.loads(line)["step"] for line in (tmp_path / "fsdp" / "metrics.jsonl").read_text().splitlines()
    ]
    assert steps == [1, 2, 3]
