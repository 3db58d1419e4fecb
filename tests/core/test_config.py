import json

import pytest

from dualtoken import ConfigError, TokenizerConfig, get_config, list_models
from dualtoken.config import QuantizerConfig, apply_overrides, from_dict, to_dict


@pytest.mark.parametrize("name", ["dualtoken-tiny", "dualtoken-so400m-384-rvq8", "dualtoken-so400m-256-rvq4"])
def test_named_configs_round_trip_through_json(name):
    config = get_config(name)
    assert TokenizerConfig.from_json(config.to_json()) == config
    assert name in list_models()


def test_release_architectures_have_the_spec_numbers():
    big = get_config("dualtoken-so400m-384-rvq8")
    assert (big.backbone.width, big.backbone.num_layers, big.backbone.patch_size, big.backbone.image_size) == (1152, 27, 14, 384)
    assert (big.pixel_layer, big.shortcut_layer, big.shortcut_weight, big.semantic_layer) == (6, 4, 0.6, 26)
    assert (big.pixel_quantizer.depth, big.pixel_quantizer.codebook_size, big.pixel_quantizer.code_dim) == (8, 16384, 32)
    assert big.pixel_quantizer.ema_schedule == "per_depth" and big.semantic_quantizer.ema_schedule == "per_step"
    assert big.decoder.latent_size == (24, 24) and big.decoder.channel_mult == (1, 1, 4, 4, 8)
    small = get_config("dualtoken-so400m-256-rvq4")
    assert small.pixel_quantizer.depth == 4 and small.backbone.patch_size == 16 and small.decoder.latent_size is None


def test_unknown_key_is_rejected_with_its_name():
    data = to_dict(get_config("dualtoken-tiny"))
    data["pixel_quantizer"]["codebok_size"] = 3
    with pytest.raises(ConfigError, match="codebok_size"):
        from_dict(TokenizerConfig, data)


def test_wrong_type_is_rejected():
    data = to_dict(get_config("dualtoken-tiny"))
    data["pixel_layer"] = "two"
    with pytest.raises(ConfigError, match="pixel_layer"):
        TokenizerConfig.from_json(json.dumps(data))


def test_impossible_taps_are_rejected():
    data = to_dict(get_config("dualtoken-tiny"))
    data["pixel_layer"] = 6
    with pytest.raises(ConfigError, match="pixel_layer"):
        from_dict(TokenizerConfig, data)


def test_unknown_name_lists_the_known_ones():
    with pytest.raises(ConfigError, match="dualtoken-tiny"):
        get_config("dualtoken-huge")


def test_overrides_are_typed():
    config = apply_overrides(get_config("dualtoken-tiny"), ["pixel_quantizer.depth=3", "name=x"])
    assert config.pixel_quantizer.depth == 3 and config.name == "x"
    with pytest.raises(ConfigError):
        apply_overrides(config, ["pixel_quantizer.depth=deep"])
    with pytest.raises(ConfigError, match="unknown key"):
        apply_overrides(config, ["pixel_quantizer.nope=1"])


def test_quantizer_config_validates_numbers():
    with pytest.raises(ConfigError):
        QuantizerConfig(decay=1.5)
    with pytest.raises(ConfigError):
        QuantizerConfig(depth=0)
