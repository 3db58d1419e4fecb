"""recipes/mllm_cifar/pair_study.py: DualToken against a naive pair of tokenizers in the CIFAR MLLM, at a tiny size."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dualtoken import DualTokenizer, TokenizerPair
from dualtoken.config import apply_overrides
from dualtoken.registry import get_config

from .test_recipe_cifar import TINY

STUDY = Path(__file__).resolve().parents[2] / "recipes" / "mllm_cifar" / "pair_study.py"


def _study_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("pair_study", STUDY)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_the_pair_members_have_dualtokens_vocabulary_shapes_and_one_objective_each():
    study = _study_module()
    base = study.ablation.load_train_config(str(study.HERE.parent / "efflite0" / "cpu.json"), [])
    model = study.ablation.recipe_model(base)
    members = study.member_overrides(model)
    pixel = study.ablation.recipe_model(study.ablation.variant_config(base, members["p_pixel_only"]))
    semantic_config = study.ablation.variant_config(base, members["s_semantic_only"])
    semantic = study.ablation.recipe_model(semantic_config)
    assert pixel.pixel_quantizer is None and semantic.pixel_quantizer is None  # one codebook each
    assert pixel.semantic_layer == model.pixel_layer and semantic.semantic_layer == model.semantic_layer
    for member, side in ((pixel, model.pixel_quantizer), (semantic, model.semantic_quantizer)):
        q = member.semantic_quantizer
        assert (q.depth, q.codebook_size, q.code_dim) == (side.depth, side.codebook_size, side.code_dim)
    assert study.ablation.bits_per_position(pixel) + study.ablation.bits_per_position(semantic) == (
        study.ablation.bits_per_position(model)
    )  # the pair spends DualToken's bits
    pixel_config = study.ablation.variant_config(base, members["p_pixel_only"])
    assert pixel_config.loss.semantic_weight == 0 and pixel_config.teacher == "none"
    loss = semantic_config.loss
    assert loss.pixel_mse == loss.pixel_l1 == loss.perceptual == 0 and loss.semantic_weight > 0


def test_a_missing_tokenizer_is_one_line_and_exit_2(tmp_path):
    done = subprocess.run(
        [sys.executable, str(STUDY), "arms", "--out", str(tmp_path)], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 2
    assert done.stderr.strip().count("\n") == 0 and "run the tokenizers stage first" in done.stderr


def _single_vocabulary(seed: int) -> DualTokenizer:
    torch.manual_seed(seed)
    overrides = ["pixel_quantizer=null", "shortcut_layer=null"]
    return DualTokenizer.from_config(apply_overrides(get_config("dualtoken-tiny"), overrides))


@pytest.mark.slow
@pytest.mark.data
def test_the_study_trains_every_arm_and_scores_them_with_intervals(tmp_path, shared_data, tiny_tokenizer):
    out = tmp_path / "study"
    for run, model in (("d_dualtoken", tiny_tokenizer), ("p_pixel_only", _single_vocabulary(1)),
                       ("s_semantic_only", _single_vocabulary(2))):
        model.save_pretrained(out / "tokenizers" / run / "export-00000100")  # what the tokenizers stage leaves
    settings = [*TINY, f"data={shared_data / 'cifar10'}", "generation_modes=[\"both\"]"]
    command = [sys.executable, str(STUDY), "all", "--out", str(out), "--bootstrap", "50", "--fd-bootstrap", "3",
               *(arg for s in settings for arg in ("--mllm-set", s))]
    done = subprocess.run(command, capture_output=True, text=True, timeout=900, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]

    assert isinstance(TokenizerPair.from_pretrained(out / "tokenizers" / "pair"), TokenizerPair)
    for arm in ("dualtoken", "pair"):
        for seed in (0, 1):
            work = out / "arms" / arm / f"seed{seed}"
            config = json.loads((work / "train_both.json").read_text())
            assert config["seed"] == seed and (work / "per_image.pt").is_file()
    assert (out / "arms" / "pair" / "seed1" / "tokens").is_symlink()  # seed 1 reads seed 0's tokens
    result = json.loads((out / "pair_study.json").read_text())
    modes = {(r["arm"], r["seed"], r["mode"]) for r in result["rows"]}
    assert modes == {("dualtoken", 0, "both"), ("dualtoken", 0, "semantic"), ("dualtoken", 0, "pixel"),
                     ("dualtoken", 1, "both"), ("pair", 0, "both"), ("pair", 1, "both")}
    for row in result["rows"]:
        answers = row["answers"]
        assert answers["n"] == 10 and 0 <= answers["low"] <= answers["mean"] <= answers["high"] <= 1
        if row["mode"] == "both":
            assert row["requested_class"]["n"] == 10 and row["frechet"]["mean"] > 0
    assert [(d["seed"], d["axis"]) for d in result["differences"]] == [
        (0, "answer accuracy"), (0, "requested class"), (1, "answer accuracy"), (1, "requested class")
    ]
    assert result["costs"]["pair"]["codes_per_position"] == 8 and result["costs"]["dualtoken"]["positions"] == 64
    assert 0 <= result["judge_on_real_test_images"]["mean"] <= 1
    for row in result["rows"]:  # the basic interval contains the full-sample distance
        if "frechet" in row:
            assert row["frechet"]["low"] <= row["frechet"]["mean"] <= row["frechet"]["high"]
    assert "| pair | 1 | semantic + pixel |" in (out / "pair_study.md").read_text()
