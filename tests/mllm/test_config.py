"""The MLLM trainer's config takes the tokenizer trainer's names; files with the old names still load."""

from __future__ import annotations

import json

import pytest

from dualtoken.config import apply_overrides, to_dict
from dualtoken.errors import ConfigError
from dualtoken.mllm import MLLMTrainConfig
from dualtoken.mllm.config import load_config
from dualtoken.training import TrainConfig

SHARED_NAMES = ("output_dir", "max_steps", "grad_accum", "seed", "device", "precision", "parallel", "optimizer",
                "checkpoint", "log")


def test_the_two_trainers_share_their_names():
    mllm, tokenizer = to_dict(MLLMTrainConfig(init_from="m")), to_dict(TrainConfig())
    for name in SHARED_NAMES:
        assert name in mllm and name in tokenizer, name
        if isinstance(tokenizer[name], dict):
            assert set(mllm[name]) == set(tokenizer[name]), name
    assert "batch_size" in mllm["data"] and "batch_size" in tokenizer["data"]


def test_a_file_with_the_old_names_loads(tmp_path):
    old = {
        "init_from": "model", "out_dir": "runs/x", "steps": 7, "optim": {"lr": 0.01}, "batch_size": 3,
        "save_every": 2, "keep_last": 4, "log_every": 1, "console": True, "tensorboard": False, "bf16": True,
    }
    (tmp_path / "old.json").write_text(json.dumps(old))
    config = load_config(MLLMTrainConfig, tmp_path / "old.json")
    assert config.output_dir == str(tmp_path / "runs" / "x")  # relative to the file's folder
    assert (config.max_steps, config.optimizer.lr, config.data.batch_size) == (7, 0.01, 3)
    assert (config.checkpoint.every, config.checkpoint.keep_last) == (2, 4)
    assert (config.log.every, config.log.console, config.log.tensorboard) == (1, True, False)
    assert config.precision == "bf16"


def test_new_names_take_overrides_and_old_ones_do_not(tmp_path):
    config = apply_overrides(MLLMTrainConfig(init_from="m"), ["max_steps=3", "checkpoint.every=1", "precision=fp32"])
    assert (config.max_steps, config.checkpoint.every, config.precision) == (3, 1, "fp32")
    with pytest.raises(ConfigError, match="unknown key 'steps'"):
        apply_overrides(config, ["steps=3"])


def test_the_depth_prefix_round_trips_and_rejects_nonsense():
    from dualtoken.config import from_dict
    from dualtoken.mllm import MLLMConfig

    config = MLLMConfig(pixel_depths=2, semantic_depths=3)
    assert from_dict(MLLMConfig, json.loads(json.dumps(to_dict(config)))) == config
    assert (MLLMConfig().pixel_depths, MLLMConfig().semantic_depths) == (None, None)  # all depths by default
    with pytest.raises(ConfigError, match="semantic_depths must be >= 1"):
        MLLMConfig(semantic_depths=0)
    with pytest.raises(ConfigError, match="pixel_depths must be >= 1"):
        apply_overrides(MLLMConfig(), ["pixel_depths=-1"])


def test_the_tokenizer_image_size_round_trips_and_rejects_nonsense():
    from dualtoken.config import from_dict
    from dualtoken.mllm import MLLMConfig

    config = MLLMConfig(tokenizer="dualtoken-efflite0", tokenizer_image_size=128)
    assert from_dict(MLLMConfig, json.loads(json.dumps(to_dict(config)))) == config
    assert MLLMConfig().tokenizer_image_size is None  # the tokenizer's own size by default
    with pytest.raises(ConfigError, match="tokenizer_image_size must be >= 1"):
        MLLMConfig(tokenizer_image_size=0)
