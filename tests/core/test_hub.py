"""The Hugging Face Hub through huggingface_hub's own cache, offline: a repo id loads from a cache laid out as
huggingface_hub lays it out; a missing one is a one-line error; push_to_hub uploads the save_pretrained folder;
the model card carries the config, the rate and the figures."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import huggingface_hub
import pytest
import torch

from dualtoken import CheckpointError, DualTokenizer

REVISION = "0123456789abcdef0123456789abcdef01234567"


def make_hub_cache(cache: Path, repo_id: str, model_dir: Path) -> Path:
    """models--org--name/snapshots/<revision>/{files} and refs/main, as snapshot_download leaves them."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / REVISION
    snapshot.mkdir(parents=True)
    for file in model_dir.iterdir():
        shutil.copy2(file, snapshot / file.name)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(REVISION)
    return snapshot


@pytest.fixture
def offline_cache(tmp_path, tiny_tokenizer, monkeypatch) -> Path:
    cache = tmp_path / "hub"
    make_hub_cache(cache, "someone/dualtoken-tiny-test", tiny_tokenizer.save_pretrained(tmp_path / "saved"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    return cache


def test_a_repo_id_loads_from_the_hub_cache(offline_cache, tiny_tokenizer):
    loaded = DualTokenizer.from_pretrained("someone/dualtoken-tiny-test")
    assert loaded.name_or_path == "someone/dualtoken-tiny-test"
    assert loaded.model_dir.parent.name == "snapshots"
    for key, value in tiny_tokenizer.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


def test_a_repo_missing_from_the_cache_offline_is_one_clear_error(offline_cache):
    with pytest.raises(CheckpointError, match="not in the Hugging Face cache.*HF_HUB_OFFLINE is set"):
        DualTokenizer.from_pretrained("someone/other-model")


def test_the_command_line_reads_the_cache_named_by_the_environment(offline_cache, tmp_path):
    env = {**os.environ, "HF_HUB_CACHE": str(offline_cache), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "dualtoken", "info", "--model", "someone/dualtoken-tiny-test"],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "8x8 positions x (4 pixel + 4 semantic codes)" in result.stdout


def test_push_to_hub_uploads_the_saved_folder(tiny_tokenizer, tmp_path, monkeypatch):
    uploaded = {}

    class FakeApi:
        def __init__(self, token=None):
            pass

        def create_repo(self, repo_id, private=None, exist_ok=False):
            return type("Repo", (), {"repo_id": repo_id})()

        def upload_folder(self, repo_id, folder_path, **kwargs):
            uploaded.update(repo_id=repo_id, files=sorted(p.name for p in Path(folder_path).iterdir()))
            return "commit"

    monkeypatch.setattr(huggingface_hub.hub_mixin, "HfApi", FakeApi)
    tiny_tokenizer.save_pretrained(tmp_path / "out", push_to_hub=True, repo_id="someone/tiny")
    assert uploaded == {"repo_id": "someone/tiny", "files": ["README.md", "config.json", "model.safetensors"]}


def test_the_model_card_has_config_rate_and_figures(tiny_tokenizer, tmp_path):
    folder = tiny_tokenizer.save_pretrained(tmp_path / "m", metrics={"psnr": 21.5, "images": 24})
    card = (folder / "README.md").read_text()
    assert card.startswith("---\n") and "library_name: dualtoken" in card
    rate = tiny_tokenizer.bits_per_pixel()  # 4 depths x 8 bits x 64 positions / 4096 pixels = 0.5
    assert rate["pixel"] == pytest.approx(0.5) and rate["total"] == pytest.approx(1.0)
    assert "0.5000 bits per pixel" in card
    assert "| psnr | 21.5 |" in card and "| images | 24 |" in card
    config_block = card.split("```json\n", 1)[1].split("```", 1)[0]
    assert json.loads(config_block) == json.loads(tiny_tokenizer.config.to_json())


# ----------------------------------------------------------------------------------------------------------------
# Pretrained towers by their Hub id: the SigLIP vision tower, the teacher and zero-shot's text tower
# ----------------------------------------------------------------------------------------------------------------

TOWER_ID = "google/siglip-tiny-test"


@pytest.fixture
def offline_tower(tmp_path, monkeypatch):
    """A tiny random SiglipModel (vision: the dualtoken-tiny tower; a text tower and a word-level tokenizer) saved
    with transformers' save_pretrained, laid out in an offline Hugging Face cache as TOWER_ID."""
    from ..evaluation.conftest import CLASS_NAMES, save_tiny_siglip

    model = save_tiny_siglip(tmp_path / "saved_siglip", seed=5)
    (tmp_path / "classes.txt").write_text("\n".join(CLASS_NAMES) + "\n")
    cache = tmp_path / "hub"
    make_hub_cache(cache, TOWER_ID, tmp_path / "saved_siglip")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.chdir(tmp_path)
    return model


def test_a_siglip_tower_teacher_and_text_tower_come_by_their_hub_id_offline(offline_tower, tmp_path):
    from dualtoken.evaluation.config import EvalConfig
    from dualtoken.evaluation.semantic import build_classifier

    tok = DualTokenizer.from_config("dualtoken-tiny", backbone_path=TOWER_ID)
    assert tok.config.backbone.pretrained == TOWER_ID  # the config names the Hub id, not a cache path
    expected = offline_tower.vision_model.state_dict()
    for key, value in tok.backbone.vision_model.state_dict().items():
        assert torch.equal(value, expected[key]), key
    images = torch.rand(1, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        reference = offline_tower.vision_model(pixel_values=images).pooler_output
        teacher = DualTokenizer.from_pretrained(tok.save_pretrained(tmp_path / "model")).teacher()
        assert torch.allclose(teacher.pool(teacher.forward_all(images)[-1]), reference, atol=1e-5)

    classifier, reason = build_classifier(tok, EvalConfig(classifier_cache=str(tmp_path / "zs")), tmp_path / "classes.txt")
    assert reason is None and classifier.kind == "zeroshot" and classifier.num_classes == 3
    assert f"models--{TOWER_ID.replace('/', '--')}" in classifier.description["text_tower"]

    # huggingface_hub's URL form, and a pinned revision
    by_url = DualTokenizer.from_config("dualtoken-tiny", backbone_path=f"hf://{TOWER_ID}")
    assert by_url.config.backbone.pretrained == TOWER_ID
    assert torch.equal(by_url.backbone.vision_model.post_layernorm.weight, expected["post_layernorm.weight"])
    pinned = dataclasses.replace(tok.config.backbone, pretrained_revision=REVISION)
    assert torch.equal(type(tok.backbone).teacher(pinned).vision_model.post_layernorm.weight,
                       expected["post_layernorm.weight"])
    with pytest.raises(CheckpointError, match="not in the Hugging Face cache"):
        type(tok.backbone).teacher(dataclasses.replace(pinned, pretrained_revision="f" * 40))


def test_a_tower_missing_from_the_cache_offline_is_one_clear_error(offline_tower):
    with pytest.raises(CheckpointError, match="google/siglip-other.*not in the Hugging Face cache.*HF_HUB_OFFLINE"):
        DualTokenizer.from_config("dualtoken-tiny", backbone_path="google/siglip-other")
    with pytest.raises(CheckpointError, match="not a SigLIP folder"):
        DualTokenizer.from_config("dualtoken-tiny", backbone_path="../no/such/folder")


def test_the_paper_recipes_name_the_tower_by_its_hub_id():
    from dualtoken.training import load_train_config

    repo = Path(__file__).resolve().parents[2]
    for stage in ("stage0", "stage1"):
        config = load_train_config(repo / "recipes" / f"paper-{stage}-so400m-384-rvq8.json", [])
        assert config.backbone_pretrained == "hf://google/siglip2-so400m-patch14-384"  # not taken as a path
        assert config.loss.vgg_weights is None and config.loss.perceptual_kind == "lpips_vgg16"  # torch's hub cache
