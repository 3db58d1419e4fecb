"""The registry: names by kind, errors that say what a name is and what to do, one backbone registry, no cycle."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from dualtoken import CheckpointError, ConfigError, DualTokenizer, TokenizerConfig, get_config, list_models
from dualtoken.backbones import BACKBONES, EfficientNetBackboneConfig, SiglipBackboneConfig
from dualtoken.config import from_dict, to_dict
from dualtoken.registry import DEFAULT_MODEL, model_entry, resolve_model_dir

BACKBONES_DIR = Path(__file__).resolve().parents[2] / "src" / "dualtoken" / "backbones"


def test_list_models_says_which_names_are_trained():
    trained = list_models(trained=True)
    assert DEFAULT_MODEL in trained and "dualtoken-tiny" not in trained
    assert set(trained) < set(list_models())
    assert {"dualtoken-tiny", "dualtoken-b16-224-rvq4", "dualtoken-so400m-384-rvq8"} <= set(list_models())
    assert all(model_entry(name).trained == (name in trained) for name in list_models())


def test_every_name_has_a_config_and_a_registered_backbone():
    for name in list_models():
        config = get_config(name)
        assert isinstance(config, TokenizerConfig)
        assert config.backbone.kind in BACKBONES
        assert isinstance(config.backbone, BACKBONES[config.backbone.kind].config_class)


def test_an_architecture_name_is_no_trained_model_and_the_error_says_so():
    with pytest.raises(CheckpointError) as info:
        DualTokenizer.from_pretrained("dualtoken-tiny")
    message = str(info.value)
    assert "architecture without trained weights" in message and "from_config('dualtoken-tiny')" in message
    assert DEFAULT_MODEL in message  # what can be loaded instead


def test_an_unknown_name_lists_both_kinds():
    with pytest.raises(CheckpointError, match="trained models: .*dualtoken-efflite0.*architectures"):
        resolve_model_dir("dualtoken-huge")
    with pytest.raises(ConfigError, match="unknown model name 'dualtoken-huge'.*dualtoken-tiny"):
        get_config("dualtoken-huge")


def test_a_folder_without_weights_is_refused(tmp_path):
    get_config("dualtoken-tiny").save(tmp_path / "config.json")
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        DualTokenizer.from_pretrained(tmp_path)


def test_unknown_backbone_kind_names_the_known_ones():
    data = to_dict(get_config("dualtoken-tiny"))
    data["backbone"]["kind"] = "resnet"
    with pytest.raises(ConfigError, match=r"backbone\.kind: unknown backbone 'resnet'.*efficientnet_lite0.*siglip"):
        from_dict(TokenizerConfig, data)


def test_a_pretrained_folder_is_a_property_of_the_family(tmp_path):
    siglip = SiglipBackboneConfig().with_pretrained_folder(tmp_path / "siglip")
    assert siglip.pretrained == str((tmp_path / "siglip").resolve())
    with pytest.raises(ConfigError, match="takes no pretrained folder"):
        EfficientNetBackboneConfig().with_pretrained_folder(tmp_path)


def test_backbones_do_not_import_the_config_module():
    """config.py imports the backbone configs; the backbones must not import config.py back."""
    for path in BACKBONES_DIR.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                assert not (node.level == 2 and node.module == "config"), f"{path.name} imports dualtoken.config"
                assert node.module != "dualtoken.config", f"{path.name} imports dualtoken.config"
