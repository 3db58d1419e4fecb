"""Faithfulness: the reference's outputs (../shared/parity) reproduced through convert-reference."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from dualtoken import DualTokenizer
from dualtoken.cli.main import main
from dualtoken.config import DecoderConfig, QuantizerConfig, SiglipBackboneConfig, TokenizerConfig
from dualtoken.reference import _PREFIXES, _QUANTIZERS, convert_reference

ATOL = 1e-4


@pytest.fixture(scope="module")
def converted(parity_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("parity") / "model"
    code = main(["convert-reference", "--config", str(parity_dir / "config.json"), "--weights",
                 str(parity_dir / "model.safetensors"), "--siglip", str(parity_dir / "siglip"), "--out", str(out)])
    assert code == 0
    tokenizer = DualTokenizer.from_pretrained(out)
    assert tokenizer.loading_info == {"missing": [], "unexpected": []}
    return tokenizer, load_file(str(parity_dir / "expected.safetensors")), load_file(str(parity_dir / "inputs.safetensors"))["images"]


def close(actual, expected):
    assert actual.shape == expected.shape
    assert (actual.float() - expected).abs().max().item() <= ATOL


def test_eval_forward_matches_the_reference(converted):
    tok, exp, images = converted
    with torch.no_grad():
        out = tok(images, output_hidden_states=True)
    assert torch.equal(out.pixel_codes, exp["pixel_codes"])
    assert torch.equal(out.semantic_codes, exp["semantic_codes"])
    close(out.pixel_latent, exp["pix_latent"])
    close(out.semantic_latent, exp["sem_latent"])
    close(out.pixel_quantized, exp["zq_pix"])
    close(out.semantic_quantized, exp["zq_sem_latent"])
    close(out.semantic_features, exp["zq_sem"])
    close(out.pooled, exp["pooler_output"])
    close(out.reconstruction, exp["recon"])
    close(out.pixel_commitment, exp["quant_loss_pix"])
    close(out.semantic_commitment, exp["quant_loss_sem"])
    close(torch.stack(out.hidden_states), exp["hidden_states"])
    close(tok.pixel.up(out.pixel_quantized), exp["postquant_pix"])


def test_tokens_api_matches_the_reference(converted):
    tok, exp, images = converted
    with torch.no_grad():
        tokens = tok.encode(images)
        assert torch.equal(tokens.pixel, exp["pixel_codes"]) and torch.equal(tokens.semantic, exp["semantic_codes"])
        close(tok.decode(tokens.pixel), exp["recon"])
        close(tok.semantic_features(tokens.semantic), exp["zq_sem"])
        close(tok.pooled_embedding(tokens.semantic), exp["pooler_output"])


def test_training_forward_matches_the_reference(converted):
    tok, exp, images = converted
    tok.train()
    torch.manual_seed(1235)
    with torch.no_grad():
        out = tok(images)
    tok.eval()
    assert torch.equal(out.pixel_codes, exp["train_pixel_codes"])
    assert torch.equal(out.semantic_codes, exp["train_semantic_codes"])
    close(out.pooled, exp["train_pooler_output"])
    close(out.pixel_commitment, exp["train_quant_loss_pix"])
    close(out.semantic_commitment, exp["train_quant_loss_sem"])
    for short, branch in (("pix", tok.pixel), ("sem", tok.semantic)):
        close(branch.quantizer.codebook, exp[f"{short}_codebook_after"])
        close(branch.quantizer.cluster_size, exp[f"{short}_cluster_size_after"])
        close(branch.quantizer.embed_sum, exp[f"{short}_embed_sum_after"])


def test_restart_draws_replay_the_recorded_permutations(parity_dir):
    exp = load_file(str(parity_dir / "expected.safetensors"))
    torch.manual_seed(1235)
    for name, size in [(f"restart_perm_pix_{i}", 128) for i in range(4)] + [("restart_perm_sem_0", 512)]:
        assert torch.equal(torch.randperm(size), exp[name])


def test_torch_checkpoint_with_module_prefix(parity_dir, tmp_path):
    state = load_file(str(parity_dir / "model.safetensors"))
    torch.save({"epoch": 1, "state_dict": {f"module.{k}": v for k, v in state.items()}}, tmp_path / "ckpt.pt")
    tok = convert_reference(parity_dir / "config.json", tmp_path / "ckpt.pt", parity_dir / "siglip", tmp_path / "m")
    exp = load_file(str(parity_dir / "expected.safetensors"))
    images = load_file(str(parity_dir / "inputs.safetensors"))["images"]
    assert torch.equal(tok.encode(images).pixel, exp["pixel_codes"])
    assert (tmp_path / "m" / "siglip" / "config.json").is_file()  # teacher + text tower kept beside the model


# ---- another size of the architecture, exported to the release format and imported back ---------------------------


def to_release(tokenizer: DualTokenizer, folder, text_config):
    from transformers import SiglipConfig, SiglipModel

    cfg = tokenizer.config
    siglip_config = SiglipConfig(text_config=text_config, vision_config=dict(
        hidden_size=cfg.backbone.width, intermediate_size=cfg.backbone.mlp_width, num_hidden_layers=cfg.backbone.num_layers,
        num_attention_heads=cfg.backbone.num_heads, image_size=cfg.backbone.image_size, patch_size=cfg.backbone.patch_size))
    SiglipModel(siglip_config).save_pretrained(folder / "siglip")
    text = SiglipModel(siglip_config).state_dict()
    state = {f"siglip_model.{k}": v for k, v in text.items() if k.startswith(("text_model", "logit"))}
    for key, value in tokenizer.state_dict().items():
        for ref, ours in _QUANTIZERS:
            if key.startswith(ours):
                field = {"codebook": "weight", "cluster_size": "cluster_size_ema", "embed_sum": "embed_ema"}[key[len(ours):]]
                if field == "weight":
                    value = torch.cat([value, torch.randn(1, value.shape[1])])
                depth = cfg.pixel_quantizer.depth if ref == "quantizer_pix." else cfg.semantic_quantizer.depth
                for q in range(depth):
                    state[f"{ref}codebooks.{q}.{field}"] = value.clone()
                break
        else:
            for ref, ours in sorted(_PREFIXES, key=lambda p: -len(p[1])):
                if key.startswith(ours):
                    state[ref + key[len(ours):]] = value.clone()
                    break
    save_file(state, str(folder / "model.safetensors"))
    def quant(q, kind):
        return {"bottleneck_type": kind, "code_shape": [*tokenizer.grid, q.depth], "latent_shape": [*tokenizer.grid, q.code_dim],
                                 "embed_dim": q.code_dim, "n_embed": q.codebook_size, "decay": q.decay, "restart_unused_codes": True, "shared_codebook": True}
    d = cfg.decoder
    release = {"rqvaesiglip": {
        "layer_recon": cfg.pixel_layer, "layer_shortcut": cfg.shortcut_layer, "weight_shortcut": cfg.shortcut_weight, "layer_sem": cfg.semantic_layer,
        "hidden_size": cfg.backbone.width, "decoder_latent_shape": list(d.latent_size) if d.latent_size else None,
        "ddconfig": {"ch": d.channels, "ch_mult": list(d.channel_mult), "num_res_blocks": d.num_res_blocks, "attn_resolutions": list(d.attn_resolutions),
                     "resolution": d.resolution, "decoder_in_channels": d.in_channels, "out_ch": 3, "dropout": 0.0},
        "vq_pix": quant(cfg.pixel_quantizer, "rq"), "vq_sem": quant(cfg.semantic_quantizer, "rq_ema"), "pretrained_model": "siglip"}}
    (folder / "config.json").write_text(json.dumps(release))


@pytest.mark.parametrize("shortcut", [None, 4])
def test_other_sizes_round_trip_through_the_release_format(tmp_path, shortcut):
    config = TokenizerConfig(
        name="other", backbone=SiglipBackboneConfig(image_size=48, patch_size=4, width=96, num_layers=5, num_heads=3, mlp_width=80),
        pixel_layer=3, shortcut_layer=shortcut, shortcut_weight=0.3, semantic_layer=5,
        pixel_quantizer=QuantizerConfig(codebook_size=40, code_dim=12, depth=3),
        semantic_quantizer=QuantizerConfig(codebook_size=24, code_dim=6, depth=5, ema_schedule="per_step"),
        decoder=DecoderConfig(channels=32, channel_mult=(1, 2), num_res_blocks=1, attn_resolutions=(24,), resolution=48, in_channels=64, latent_size=(24, 24)),
    )
    torch.manual_seed(3)
    original = DualTokenizer.from_config(config).eval()
    to_release(original, tmp_path, dict(hidden_size=16, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2, vocab_size=16, max_position_embeddings=8))
    imported = convert_reference(tmp_path / "config.json", tmp_path / "model.safetensors", tmp_path / "siglip", tmp_path / "ours")
    assert imported.grid == (12, 12) and imported.semantic.quantizer.config.per_step_final_residual
    images = torch.rand(2, 3, 48, 48) * 2 - 1
    with torch.no_grad():
        a, b = original(images), imported(images)
    assert torch.equal(a.pixel_codes, b.pixel_codes) and torch.equal(a.semantic_codes, b.semantic_codes)
    assert a.pixel_codes.shape == (2, 12, 12, 3) and a.semantic_codes.shape == (2, 12, 12, 5)
    torch.testing.assert_close(a.reconstruction, b.reconstruction, atol=1e-5, rtol=0)
    torch.testing.assert_close(a.pooled, b.pooled, atol=1e-5, rtol=0)
