"""train_mllm and the CLI: a few steps end to end, presets, resume, chat / generate / train-mllm commands."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from dualtoken.cli.main import main
from dualtoken.config import apply_overrides, to_dict
from dualtoken.mllm import DualTokenMLLM, MLLMDataConfig, MLLMTrainConfig
from dualtoken.mllm.config import load_config
from dualtoken.mllm.train import train_mllm
from dualtoken.tokenfile import save_tokens
from dualtoken.training.config import CheckpointConfig, LogConfig, OptimizerConfig


@pytest.fixture
def run_folder(tmp_path, tiny_tokenizer, tiny_codes, tiny_images, mllm_config):
    """A folder with the visual tokenizer, a token cache, conversations, captions and a train config."""
    from dualtoken.io import save_image

    tiny_tokenizer.save_pretrained(tmp_path / "tokenizer")
    ids = ["img/a.png", "img/b.png"]
    for image, name in zip(tiny_images, ids):
        (tmp_path / "img").mkdir(exist_ok=True)
        save_image(image, tmp_path / name)
    save_tokens(
        tmp_path / "cache.safetensors", tiny_codes.pixel, tiny_codes.semantic, ids, "tiny", (256, 256)
    )
    conversations = [
        {
            "image": name,
            "conversations": [
                {"from": "human", "value": "<image>\nWhat is in this image?"},
                {"from": "gpt", "value": f"It is a {label}."},
            ],
        }
        for name, label in zip(ids, ("cat", "dog"))
    ]
    (tmp_path / "conversations.json").write_text(json.dumps(conversations))
    (tmp_path / "captions.jsonl").write_text(
        "".join(
            json.dumps({"file": n, "caption": f"Draw a {c}."}) + "\n" for n, c in zip(ids, ("cat", "dog"))
        )
    )
    config = MLLMTrainConfig(
        model=dataclasses.replace(mllm_config, tokenizer="tokenizer"),
        data=MLLMDataConfig(
            token_cache=("cache.safetensors",),
            conversations=("conversations.json",),
            captions=("captions.jsonl",),
            condition_dropout=0.0,
            batch_size=4,
        ),
        optimizer=OptimizerConfig(lr=3e-3, betas=(0.9, 0.999), weight_decay=0.0, warmup_steps=4, grad_clip=1.0),
        max_steps=40,
        log=LogConfig(every=5, console=False),
        checkpoint=CheckpointConfig(every=20, keep_last=2),
        output_dir=str(tmp_path / "run"),
    )
    (tmp_path / "train.json").write_text(json.dumps(to_dict(config)))
    return tmp_path


@pytest.mark.slow
def test_train_cli_learns_and_chat_generate_use_the_result(run_folder, capsys):
    assert main(["train-mllm", "--config", str(run_folder / "train.json"), "--quiet"]) == 0
    records = [json.loads(line) for line in (run_folder / "run" / "metrics.jsonl").read_text().splitlines()]
    assert {r["kind"] for r in records} == {"train"}
    assert [r["step"] for r in records] == list(range(5, 41, 5))
    assert records[-1]["text"] < 0.2 * records[0]["text"]
    assert records[-1]["pixel"] < records[0]["pixel"] and records[-1]["semantic"] < records[0]["semantic"]
    assert sorted(p.name for p in (run_folder / "run" / "checkpoints").iterdir()) == [
        "step-00000020.pt",
        "step-00000040.pt",
    ]
    final = run_folder / "run" / "final"
    capsys.readouterr()
    assert (
        main(
            [
                "chat",
                "--model",
                str(final),
                "--image",
                str(run_folder / "img/b.png"),
                "What is in this image?",
            ]
        )
        == 0
    )
    assert capsys.readouterr().out.strip() == "It is a dog."
    out = run_folder / "drawn.png"
    assert main(["generate", "--model", str(final), "Draw a cat.", "--cfg", "3.0", "--out", str(out)]) == 0
    from PIL import Image

    assert Image.open(out).size == (64, 64)


def test_resume_continues_exactly(run_folder):
    config = load_config(MLLMTrainConfig, run_folder / "train.json")
    config = apply_overrides(
        config, ["max_steps=6", "checkpoint.every=3", "log.every=1", "data.batch_size=2"]
    )
    straight = train_mllm(
        dataclasses.replace(config, output_dir=str(run_folder / "straight")), run_folder, progress=False
    )["export"]
    interrupted = dataclasses.replace(config, output_dir=str(run_folder / "resumed"))
    assert train_mllm(interrupted, run_folder, progress=False, stop_at=3)["export"] is None
    resumed = train_mllm(interrupted, run_folder, progress=False)["export"]
    a, b = DualTokenMLLM.from_pretrained(straight), DualTokenMLLM.from_pretrained(resumed)
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        torch.testing.assert_close(x, y, msg=name)
    logs = [(run_folder / r / "metrics.jsonl").read_text().splitlines() for r in ("straight", "resumed")]
    assert [json.loads(line)["loss"] for line in logs[0]] == pytest.approx(
        [json.loads(line)["loss"] for line in logs[1]], rel=1e-5
    )


def test_align_preset_trains_only_the_input_fusion(run_folder):
    config = load_config(MLLMTrainConfig, run_folder / "train.json")
    config = dataclasses.replace(config, max_steps=2, preset="align", output_dir=str(run_folder / "align"))
    torch.manual_seed(config.seed)
    before = DualTokenMLLM.from_config(config.model, base_dir=run_folder).state_dict()
    after = DualTokenMLLM.from_pretrained(train_mllm(config, run_folder, progress=False)["export"]).state_dict()
    changed = {name.split(".")[0] for name in before if not before[name].equal(after[name])}
    assert changed == {"fusion"}


def test_cli_errors_are_one_line(run_folder, capsys):
    (run_folder / "broken.json").write_text(json.dumps([{"conversations": [{"from": "human", "value": 1}]}]))
    config = json.loads((run_folder / "train.json").read_text())
    config["data"]["conversations"] = ["broken.json"]
    (run_folder / "bad.json").write_text(json.dumps(config))
    assert main(["train-mllm", "--config", str(run_folder / "bad.json")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("dualtoken train-mllm: error:") and "broken.json: item 0, turn 0" in err
    assert len(err.splitlines()) == 1
    assert main(["train-mllm", "--config", str(run_folder / "train.json"), "--set", "preset=everything"]) == 2
    assert "preset" in capsys.readouterr().err
    assert main(["chat", "--model", str(run_folder), "hi"]) == 2
    assert "not a DualToken MLLM folder" in capsys.readouterr().err


def test_a_question_without_an_image_gets_a_clear_message(run_folder, capsys):
    config = load_config(MLLMTrainConfig, run_folder / "train.json")
    final = train_mllm(dataclasses.replace(config, max_steps=1, output_dir=str(run_folder / "one")), run_folder, progress=False)["export"]
    capsys.readouterr()
    assert main(["chat", "--model", str(final), "What is in this image?"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "no --image: this MLLM answers about an image (64x64 px" in err and "--no-image" in err
    assert main(["chat", "--model", str(final), "--no-image", "Hello?"]) == 0
    assert capsys.readouterr().out.strip()  # some answer from the language model alone


def test_the_engine_settings_mean_the_same_for_the_mllm(run_folder):
    """grad_accum, export cadence and max_seconds as for the tokenizer tasks (tests/training/test_engine.py)."""
    from dualtoken.mllm.train import mllm_engine

    config = load_config(MLLMTrainConfig, run_folder / "train.json")
    config = apply_overrides(config, ["max_steps=4", "grad_accum=2", "checkpoint.export_every=2", "log.every=1",
                                      "log.progress=false", f"output_dir={run_folder / 'cadence'}"])
    engine = mllm_engine(config, run_folder)
    summary = engine.run()
    assert engine.task.data.batches == 8 and summary["step"] == 4
    assert sorted(p.name for p in (run_folder / "cadence").glob("export-*")) == ["export-00000002", "export-00000004"]
    record = json.loads((run_folder / "cadence" / "metrics.jsonl").read_text().splitlines()[-1])
    assert {"loss", "text", "lr", "grad_norm", "samples_per_s"} <= set(record)
    timed = apply_overrides(config, ["max_steps=100", "max_seconds=0.001", f"output_dir={run_folder / 'timed'}"])
    summary = train_mllm(timed, run_folder, progress=False)
    assert summary["out_of_time"] and summary["step"] == 1 and summary["export"]
