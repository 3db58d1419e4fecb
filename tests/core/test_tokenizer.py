import dataclasses

import pytest
import torch

from dualtoken import CheckpointError, CodesError, ConfigError, DualTokenizer, ImageError, get_config


def test_shapes_of_the_tokens_api(tiny_tokenizer, tiny_images):
    tok = tiny_tokenizer
    assert tok.image_size == (64, 64) and tok.grid == (8, 8)
    tokens = tok.encode(tiny_images)
    assert tokens.pixel.shape == (2, 8, 8, 4) and tokens.semantic.shape == (2, 8, 8, 4)
    assert tokens.pixel.dtype == torch.int64
    assert tok.decode(tokens.pixel).shape == (2, 3, 64, 64)
    assert tok.semantic_features(tokens.semantic).shape == (2, 64, 64)
    assert tok.pooled_embedding(tokens.semantic).shape == (2, 64)
    assert tok.code_embeddings(tokens.pixel, "pixel").shape == (2, 8, 8, 4, 8)
    summed = tok.code_embeddings(tokens.semantic, "semantic", per_depth=False)
    torch.testing.assert_close(summed, tok.code_embeddings(tokens.semantic, "semantic").sum(-2))


def test_decode_from_codes_equals_the_forward_reconstruction(tiny_tokenizer, tiny_images):
    with torch.no_grad():
        out = tiny_tokenizer(tiny_images)
        torch.testing.assert_close(tiny_tokenizer.decode(out.pixel_codes), out.reconstruction, atol=1e-4, rtol=0)
        torch.testing.assert_close(tiny_tokenizer.pooled_embedding(out.semantic_codes), out.pooled, atol=1e-4, rtol=0)
        tokens = tiny_tokenizer.encode(tiny_images)
    assert torch.equal(tokens.pixel, out.pixel_codes) and torch.equal(tokens.semantic, out.semantic_codes)


def test_variable_token_budget(tiny_tokenizer, tiny_images):
    codes = tiny_tokenizer.encode(tiny_images).pixel
    for k in range(1, 5):
        assert tiny_tokenizer.decode(codes[..., :k]).shape == (2, 3, 64, 64)


def test_encode_is_deterministic_and_never_updates(tiny_tokenizer, tiny_images):
    tiny_tokenizer.train()
    before = {k: v.clone() for k, v in tiny_tokenizer.state_dict().items()}
    a, b = tiny_tokenizer.encode(tiny_images), tiny_tokenizer.encode(tiny_images)
    assert torch.equal(a.pixel, b.pixel) and torch.equal(a.semantic, b.semantic)
    for k, v in tiny_tokenizer.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_save_and_load_are_bit_exact(tiny_tokenizer, tiny_images, tmp_path):
    tiny_tokenizer.save_pretrained(tmp_path / "m")
    loaded = DualTokenizer.from_pretrained(tmp_path / "m")
    assert not loaded.training and loaded.loading_info == {"missing": [], "unexpected": []}
    for (k, a), (_, b) in zip(tiny_tokenizer.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), k
    with torch.no_grad():
        assert torch.equal(tiny_tokenizer(tiny_images).reconstruction, loaded(tiny_images).reconstruction)


def test_half_precision_save_halves_the_file_and_keeps_integers(tiny_tokenizer, tmp_path):
    full = tiny_tokenizer.save_pretrained(tmp_path / "full") / "model.safetensors"
    half = tiny_tokenizer.save_pretrained(tmp_path / "half", dtype=torch.float16) / "model.safetensors"
    assert half.stat().st_size < 0.6 * full.stat().st_size
    loaded = DualTokenizer.from_pretrained(tmp_path / "half")
    for (k, a), (_, b) in zip(tiny_tokenizer.state_dict().items(), loaded.state_dict().items()):
        assert a.dtype == b.dtype, k  # loaded back into the config's float32 model
        assert torch.allclose(a.float(), b.float(), rtol=1e-3, atol=1e-4) if a.is_floating_point() else torch.equal(a, b)


def test_every_trainable_parameter_gets_a_gradient_and_codebooks_none(tiny_tokenizer, tiny_images):
    tok = tiny_tokenizer.train()
    out = tok(tiny_images)
    loss = out.reconstruction.square().mean() + out.pooled.square().mean() + out.pixel_commitment + out.semantic_commitment
    loss.backward()
    missing = [n for n, p in tok.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert missing == []
    for branch in ("pixel", "semantic"):
        assert not tok.codebook(branch).requires_grad


def test_training_forward_updates_codebooks(tiny_tokenizer, tiny_images):
    before = tiny_tokenizer.codebook("pixel").clone()
    tiny_tokenizer.train()
    with torch.no_grad():
        tiny_tokenizer(tiny_images)
    assert not torch.equal(before, tiny_tokenizer.codebook("pixel"))


def test_bf16_autocast_keeps_quantizer_choices(tiny_tokenizer, tiny_images):
    with torch.no_grad():
        taps = tiny_tokenizer._run_to_taps(tiny_images)
        reference = tiny_tokenizer.pixel.quantizer(taps.pixel_latent).codes
        with torch.autocast("cpu", dtype=torch.bfloat16):
            codes = tiny_tokenizer.pixel.quantizer(taps.pixel_latent).codes
    assert torch.equal(codes, reference)


@pytest.mark.parametrize(
    "images, message",
    [
        (torch.zeros(1, 3, 32, 32), "shape"),
        (torch.zeros(1, 1, 64, 64), "shape"),
        (torch.zeros(3, 64, 64), "shape"),
        (torch.zeros(1, 3, 64, 64, dtype=torch.uint8), "dtype"),
        (torch.full((1, 3, 64, 64), 255.0), "values"),
        (torch.full((1, 3, 64, 64), float("nan")), "values"),
        ("image.png", "str"),
    ],
)
def test_bad_images_raise_image_error(tiny_tokenizer, images, message):
    with pytest.raises(ImageError, match=message):
        tiny_tokenizer.encode(images)


@pytest.mark.parametrize(
    "codes, message",
    [
        (torch.full((1, 8, 8, 4), 256), "values"),
        (torch.full((1, 8, 8, 4), -1), "values"),
        (torch.zeros(1, 4, 4, 4, dtype=torch.long), "shape"),
        (torch.zeros(1, 8, 8, 5, dtype=torch.long), "shape"),
        (torch.zeros(1, 8, 8, 0, dtype=torch.long), "shape"),
        (torch.zeros(1, 8, 8, 4), "float32"),
    ],
)
def test_bad_codes_raise_codes_error(tiny_tokenizer, codes, message):
    with pytest.raises(CodesError, match=message):
        tiny_tokenizer.decode(codes)


def test_checkpoint_from_another_config_is_refused(tiny_tokenizer, tmp_path):
    tiny_tokenizer.save_pretrained(tmp_path / "m")
    other = dataclasses.replace(get_config("dualtoken-tiny"), pixel_quantizer=dataclasses.replace(get_config("dualtoken-tiny").pixel_quantizer, codebook_size=128))
    other.save(tmp_path / "m" / "config.json")
    with pytest.raises(CheckpointError, match="another config"):
        DualTokenizer.from_pretrained(tmp_path / "m")


def test_missing_folder_and_unknown_names(tmp_path):
    with pytest.raises(CheckpointError, match="no model .*nothing.*not a model folder"):
        DualTokenizer.from_pretrained(tmp_path / "nothing")
    with pytest.raises(ConfigError, match="unknown model name"):
        DualTokenizer.from_config("dualtoken-giant")


def test_decoder_size_must_match_the_input(tmp_path):
    config = get_config("dualtoken-tiny")
    bad = dataclasses.replace(config, decoder=dataclasses.replace(config.decoder, channel_mult=(1, 1)))
    with pytest.raises(ConfigError, match="decoder outputs"):
        DualTokenizer.from_config(bad)


def test_single_vocabulary_decodes_the_semantic_codes(tiny_images):
    config = dataclasses.replace(get_config("dualtoken-tiny"), pixel_quantizer=None, shortcut_layer=None, pixel_layer=5)
    tok = DualTokenizer.from_config(config).eval()
    with torch.no_grad():
        out = tok(tiny_images)
        tokens = tok.encode(tiny_images)
        assert torch.equal(out.pixel_codes, out.semantic_codes) and torch.equal(tokens.pixel, tokens.semantic)
        assert out.pixel_commitment.item() == 0.0 and out.semantic_commitment.item() > 0
        torch.testing.assert_close(tok.decode(tokens.pixel), out.reconstruction, atol=1e-4, rtol=0)
    assert tok.codebook("pixel") is tok.codebook("semantic")
    tok.train()
    out = tok(tiny_images)
    (out.reconstruction.square().mean() + out.pooled.square().mean() + out.semantic_commitment).backward()
    assert [n for n, p in tok.named_parameters() if p.grad is None] == []


def test_release_geometry_384_over_patch_14_gives_27x27():
    from dualtoken.backbones import SiglipBackbone

    config = get_config("dualtoken-so400m-384-rvq8").backbone
    small = dataclasses.replace(config, width=64, num_layers=1, num_heads=2, mlp_width=32)
    backbone = SiglipBackbone.from_config(small)
    assert backbone.grid == (27, 27)
    assert backbone.embed(torch.zeros(1, 3, 384, 384)).shape == (1, 729, 64)


def test_the_pixel_only_forward_is_the_pixel_half_of_the_full_forward(tiny_tokenizer, tiny_images):
    with torch.no_grad():
        full = tiny_tokenizer(tiny_images)
        pixel = tiny_tokenizer(tiny_images, pixel_only=True)
    assert torch.equal(pixel.pixel_codes, full.pixel_codes)
    torch.testing.assert_close(pixel.reconstruction, full.reconstruction, atol=1e-5, rtol=0)
    torch.testing.assert_close(pixel.pixel_commitment, full.pixel_commitment)
    assert pixel.semantic_codes is None and pixel.pooled is None and float(pixel.semantic_commitment) == 0.0
    torch.testing.assert_close(tiny_tokenizer.pixel_latents(tiny_images), full.pixel_latent)


def test_the_pixel_only_forward_stops_at_the_pixel_tap(tiny_tokenizer, tiny_images):
    ran = []
    hooks = [layer.register_forward_hook(lambda *_, i=i: ran.append(i)) for i, layer in tiny_tokenizer.backbone.parts().items() if isinstance(i, int)]
    with torch.no_grad():
        tiny_tokenizer(tiny_images, pixel_only=True)
    for hook in hooks:
        hook.remove()
    assert max(ran) == tiny_tokenizer.config.pixel_layer
