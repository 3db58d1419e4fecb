"""An exported model is named by its folder (or a name given at export) and says what it was fine-tuned from;
a model built from an architecture, or renamed in its config, keeps its config's name."""

import dataclasses
import json

import torch
from safetensors import safe_open

from dualtoken import DualTokenizer
from dualtoken.checkpoint import save_pretrained
from dualtoken.cli.main import main
from dualtoken.serving import create_app
from dualtoken.tokenfile import load_tokens


def test_a_fine_tuned_export_is_named_by_its_run_and_names_its_base(tiny_tokenizer, tmp_path):
    base = tiny_tokenizer.save_pretrained(tmp_path / "base")  # built from an architecture: keeps its name
    assert json.loads((base / "config.json").read_text())["name"] == "dualtoken-tiny"

    tuned = DualTokenizer.from_pretrained(base)  # the trainer's fine-tune starts like this
    copy = tuned.save_pretrained(tmp_path / "copy")  # nothing trained yet: a copy, not a fine-tune
    card = (copy / "README.md").read_text()
    assert "A copy of `dualtoken-tiny`" in card and "Fine-tuned" not in card
    assert json.loads((copy / "config.json").read_text())["base_model"] == "dualtoken-tiny"
    with torch.no_grad():
        next(tuned.parameters()).add_(1e-3)  # one weight changed: now a fine-tune
    final = tuned.save_pretrained(tmp_path / "ft" / "final")
    export = tuned.save_pretrained(tmp_path / "ft" / "export-00000100")
    mine = tuned.save_pretrained(tmp_path / "my_model")
    named = save_pretrained(tuned, tmp_path / "elsewhere", name="birds-v2")
    for folder, name in ((final, "ft"), (export, "ft-export-00000100"), (mine, "my_model"), (named, "birds-v2")):
        config = json.loads((folder / "config.json").read_text())
        assert (config["name"], config["base_model"]) == (name, "dualtoken-tiny"), folder
        card = (folder / "README.md").read_text()
        assert f"\n# {name}\n" in card and "Fine-tuned from `dualtoken-tiny`." in card
        with safe_open(str(folder / "model.safetensors"), framework="pt") as handle:
            assert handle.metadata()["model"] == name
    assert tuned.config.name == "dualtoken-tiny"  # the model in memory is not renamed

    # a second generation keeps the chain's nearest base
    again = DualTokenizer.from_pretrained(final).save_pretrained(tmp_path / "ft2" / "final")
    assert json.loads((again / "config.json").read_text())["base_model"] == "ft"

    # renamed in its config before saving (the shipping script): that name, nothing invented
    shipped = DualTokenizer.from_pretrained(base)
    shipped.config = dataclasses.replace(shipped.config, name="dualtoken-shipped")
    config = json.loads((shipped.save_pretrained(tmp_path / "out").joinpath("config.json")).read_text())
    assert (config["name"], config["base_model"]) == ("dualtoken-shipped", None)


def test_commands_and_the_page_show_the_exported_name(tiny_tokenizer, tmp_path, capsys):
    from fastapi.testclient import TestClient
    from PIL import Image

    base = tiny_tokenizer.save_pretrained(tmp_path / "base")
    final = DualTokenizer.from_pretrained(base).save_pretrained(tmp_path / "ft" / "final")
    Image.new("RGB", (64, 64), (10, 200, 30)).save(tmp_path / "a.png")
    assert main(["encode", str(tmp_path / "a.png"), "--model", str(final), "--out", str(tmp_path / "t.safetensors")]) == 0
    assert load_tokens(tmp_path / "t.safetensors").model == "ft"
    assert main(["reconstruct", str(tmp_path / "a.png"), "--model", str(final), "--out", str(tmp_path / "r")]) == 0
    metrics = json.loads((tmp_path / "r" / "metrics.json").read_text())
    assert (metrics["model"], metrics["base_model"]) == ("ft", "dualtoken-tiny")
    with TestClient(create_app(DualTokenizer.from_pretrained(final))) as client:
        info = client.get("/v1/models").json()["models"][0]
    assert (info["name"], info["base_model"]) == ("ft", "dualtoken-tiny")


def test_float16_export_halves_the_file_and_loads_as_the_same_model(tiny_tokenizer, tmp_path):
    """The README's dtype choice next to save_pretrained: float16 is about half the float32 file."""
    full = tiny_tokenizer.save_pretrained(tmp_path / "f32") / "model.safetensors"
    half = tiny_tokenizer.save_pretrained(tmp_path / "f16", dtype=torch.float16) / "model.safetensors"
    assert 0.45 < half.stat().st_size / full.stat().st_size < 0.55
    with safe_open(str(half), framework="pt") as handle:
        assert {handle.get_tensor(key).dtype for key in handle.keys()} & {torch.float16}
        assert torch.float32 not in {handle.get_tensor(key).dtype for key in handle.keys()}
    again = DualTokenizer.from_pretrained(tmp_path / "f16")
    assert again.config == tiny_tokenizer.config
