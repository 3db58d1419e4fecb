"""save_pretrained / from_pretrained of the whole MLLM, LoRA export, bad folders."""

from __future__ import annotations

import json

import pytest
import torch

from dualtoken.errors import CheckpointError, ConfigError
from dualtoken.mllm import DualTokenMLLM, LoraSettings, generate_images


def _train_a_little(model, batch, steps=3):
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(steps):
        optimizer.zero_grad()
        model(batch).loss.backward()
        optimizer.step()


def test_save_load_round_trip(make_mllm, tiny_codes, mixed_batch, tmp_path):
    model = make_mllm()
    batch = mixed_batch(model, tiny_codes)
    _train_a_little(model.train(), batch)
    model.eval()
    path = model.save_pretrained(tmp_path / "mllm")
    assert sorted(p.name for p in path.iterdir()) == [
        "llm",
        "mllm.safetensors",
        "mllm_config.json",
        "text_tokenizer",
        "tokenizer",
    ]
    saved = json.loads((path / "mllm_config.json").read_text())
    assert (
        saved["llm"]["path"] == "llm"
        and saved["llm"]["architecture"] is None
        and saved["tokenizer"] == "tokenizer"
    )
    loaded = DualTokenMLLM.from_pretrained(path)
    assert not loaded.training
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert a.equal(b), name
    assert loaded.text_tokenizer.get_vocab() == model.text_tokenizer.get_vocab()
    torch.testing.assert_close(loaded(batch).loss, model(batch).loss)
    ours = generate_images(model, ["Draw a dog."], seed=4)
    theirs = generate_images(loaded, ["Draw a dog."], seed=4)
    assert ours.pixel_codes.equal(theirs.pixel_codes) and ours.images.equal(theirs.images)
    # saving again over the folder replaces it atomically
    loaded.save_pretrained(path)
    assert DualTokenMLLM.from_pretrained(path).own_state().keys() == model.own_state().keys()


def test_lora_trains_adapters_only_and_exports_merged(make_mllm, tiny_codes, mixed_batch, tmp_path):
    from dualtoken.mllm.train import set_trainable

    model = make_mllm()
    model.enable_lora(LoraSettings(r=4, alpha=8.0, dropout=0.0))
    names = set_trainable(model, "full", lora=True)
    assert any("lora_" in n for n in names) and not any(
        n.startswith("llm.") and "lora_" not in n for n in names
    )
    batch = mixed_batch(model, tiny_codes)
    base = {n: p.detach().clone() for n, p in model.llm.named_parameters() if "lora_" not in n}
    _train_a_little(model.train(), batch)
    assert all(p.equal(base[n]) for n, p in model.llm.named_parameters() if "lora_" not in n)
    model.eval()
    loaded = DualTokenMLLM.from_pretrained(model.save_pretrained(tmp_path / "lora"))
    assert not loaded.lora_enabled
    torch.testing.assert_close(loaded(batch).loss, model(batch).loss, atol=1e-4, rtol=1e-4)
    with pytest.raises(ConfigError, match="preset that trains the LLM"):
        set_trainable(model, "align", lora=True)


def test_bad_folders_are_checkpoint_errors(make_mllm, tmp_path):
    with pytest.raises(CheckpointError, match="not a DualToken MLLM folder"):
        DualTokenMLLM.from_pretrained(tmp_path)
    path = make_mllm().save_pretrained(tmp_path / "m")
    from safetensors.torch import load_file, save_file

    state = load_file(str(path / "mllm.safetensors"))
    state.pop(next(iter(state)))
    save_file(state, str(path / "mllm.safetensors"))
    with pytest.raises(CheckpointError, match="belongs to another MLLM config"):
        DualTokenMLLM.from_pretrained(path)
