"""Precision settings: how auto / fp32 / bf16 resolve, the tokenizer's encode/decode precision, the command line's
--precision, and float32 numerics of the quantizer and losses under bf16 autocast."""

import pytest
import torch

from dualtoken import precision
from dualtoken.cli.main import main
from dualtoken.errors import ConfigError
from dualtoken.losses import distillation_kl, l1, mean_cosine, mse
from dualtoken.quantizer import nearest_codes


@pytest.fixture(autouse=True)
def _default_precision():
    yield
    precision.set_inference_precision("auto")


@pytest.fixture
def bf16_units(monkeypatch):
    """Pretend this CPU multiplies bf16 in hardware (bf16 then runs, emulated and slowly, but correctly)."""
    monkeypatch.setattr(precision, "cpu_has_bf16_matmul", lambda: True)
    monkeypatch.setattr(precision, "cpu_prefers_bf16", lambda: True)


@pytest.fixture
def no_bf16_units(monkeypatch):
    monkeypatch.setattr(precision, "cpu_has_bf16_matmul", lambda: False)
    monkeypatch.setattr(precision, "cpu_prefers_bf16", lambda: False)


def test_auto_follows_the_cpus_bf16_units(monkeypatch):
    # (bf16 units, AMX tiles): only AMX makes auto bf16; AVX-512 BF16 alone allows an explicit bf16
    for units, amx, expected in ((False, False, None), (True, False, None), (True, True, torch.bfloat16)):
        monkeypatch.setattr(precision, "cpu_has_bf16_matmul", lambda units=units: units)
        monkeypatch.setattr(precision, "cpu_prefers_bf16", lambda amx=amx: amx)
        assert precision.autocast_dtype("auto", "cpu") is expected
        assert precision.explain("auto", "cpu").startswith("float32" if expected is None else "bf16 autocast")
        assert (precision.autocast_dtype("bf16", "cpu") is torch.bfloat16) if units else True
    assert precision.autocast_dtype("fp32", "cpu") is None
    assert set(precision.cpu_bf16_flags()) == {"amx_tile", "avx512_bf16", "avx512", "avx2"}


def test_bf16_without_units_and_unknown_settings_are_config_errors(no_bf16_units):
    with pytest.raises(ConfigError, match="bf16 matrix units"):
        precision.autocast_dtype("bf16", "cpu")
    with pytest.raises(ConfigError, match="unknown precision"):
        precision.set_inference_precision("fp8")
    with pytest.raises(ConfigError, match="unknown precision"):
        precision.check_precision("fp16", precision.INFERENCE_PRECISIONS)


def test_encode_and_decode_take_the_call_then_the_model_then_the_process_setting(
    tiny_tokenizer, tiny_images, no_bf16_units
):
    tokens = tiny_tokenizer.encode(tiny_images)
    fp32 = tiny_tokenizer.encode(tiny_images, precision="fp32")
    assert torch.equal(tokens.pixel, fp32.pixel) and torch.equal(tokens.semantic, fp32.semantic)
    with pytest.raises(ConfigError):
        tiny_tokenizer.encode(tiny_images, precision="bf16")
    tiny_tokenizer.precision = "bf16"
    with pytest.raises(ConfigError):
        tiny_tokenizer.decode(tokens.pixel)
    assert tiny_tokenizer.decode(tokens.pixel, precision="fp32").dtype == torch.float32  # the call wins
    tiny_tokenizer.precision = None
    precision.set_inference_precision("bf16")
    with pytest.raises(ConfigError):
        tiny_tokenizer.encode(tiny_images)


def test_bf16_encode_keeps_exact_codes_for_its_latents_and_decode_returns_float32(
    tiny_tokenizer, tiny_images, bf16_units
):
    quantizer = tiny_tokenizer.quantizer("semantic")
    seen = {}
    original = quantizer.forward

    def recording(x, update=None):
        seen["latent"] = x.detach().float().reshape(-1, quantizer.config.code_dim).clone()
        seen["autocast"] = torch.is_autocast_enabled("cpu")
        return original(x, update)

    quantizer.forward = recording
    tokens = tiny_tokenizer.encode(tiny_images, precision="bf16")
    assert seen["autocast"]
    residual, expected = seen["latent"], []
    for _ in range(quantizer.depth):  # the float32 search, depth after depth, on the latents bf16 produced
        expected.append(nearest_codes(residual, quantizer.codebook))
        residual = residual - quantizer.codebook[expected[-1]]
    assert torch.equal(tokens.semantic.reshape(residual.shape[0], -1), torch.stack(expected, 1))
    images = tiny_tokenizer.decode(tokens.pixel, precision="bf16")
    assert images.dtype == torch.float32
    reference = tiny_tokenizer.decode(tokens.pixel, precision="fp32")
    assert (images - reference).abs().mean() < 0.05


def test_training_quantizer_under_bf16_autocast_keeps_float32_state():
    from dualtoken.config import QuantizerConfig
    from dualtoken.quantizer import ResidualQuantizer

    def run(autocast: bool):
        torch.manual_seed(0)
        q = ResidualQuantizer(QuantizerConfig(codebook_size=64, code_dim=8, depth=3)).train()
        x = torch.randn(128, 8).bfloat16().float()  # the same (bf16-representable) inputs either way
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = [q(x.bfloat16() if autocast else x) for _ in range(3)]
        return q, out

    q32, out32 = run(False)
    q16, out16 = run(True)
    for name, buffer in q16.state_dict().items():
        assert buffer.dtype == torch.float32, name
        assert torch.equal(buffer, q32.state_dict()[name]), name
    for a, b in zip(out32, out16):
        assert torch.equal(a.codes, b.codes)
        assert b.commitment.dtype == torch.float32 and b.quantized.dtype == torch.float32
        torch.testing.assert_close(a.commitment, b.commitment)


def test_losses_reduce_in_float32_under_bf16_autocast():
    prediction, target = torch.randn(4, 10).bfloat16(), torch.randn(4, 10).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        values = [mse(prediction, target), l1(prediction, target), mean_cosine(prediction, target),
                  distillation_kl(prediction, target, 2.0)]
    assert all(v.dtype == torch.float32 for v in values)
    torch.testing.assert_close(values[0], torch.nn.functional.mse_loss(prediction.float(), target.float()))


@pytest.fixture
def photo_dir(tmp_path):
    import numpy as np
    from PIL import Image

    folder = tmp_path / "photos"
    folder.mkdir()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(folder / "a.png")
    return folder


@pytest.mark.parametrize("value, message", [("bf16", "bf16 matrix units"), ("fp8", "unknown precision 'fp8'")])
def test_cli_precision_errors_are_one_line_and_exit_2(value, message, photo_dir, tmp_path, capsys, no_bf16_units):
    args = ["encode", str(photo_dir), "--model", "dualtoken-tiny", "--random-weights", "--precision", value,
            "--out", str(tmp_path / "t.safetensors")]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0] and err[0].startswith("dualtoken encode: error:")


def test_cli_prints_the_resolved_precision_once(photo_dir, tmp_path, capsys, no_bf16_units):
    for command in (["encode", str(photo_dir), "--out", str(tmp_path / "t.safetensors")],
                    ["decode", str(tmp_path / "t.safetensors"), "--out", str(tmp_path / "dec")]):
        assert main(command + ["--model", "dualtoken-tiny", "--random-weights", "--backend", "torch"]) == 0
        err = capsys.readouterr().err
        assert err.count("precision: ") == 1
        assert "note: precision: float32 (auto: this CPU has no bf16 matrix units" in err
    assert main(["reconstruct", str(photo_dir), "--model", "dualtoken-tiny", "--random-weights", "--precision",
                 "fp32", "--backend", "torch", "--out", str(tmp_path / "rec")]) == 0
    assert "note: precision: float32 (fp32); backend: torch (torch)" in capsys.readouterr().err
    assert main(["reconstruct", str(photo_dir), "--model", "dualtoken-tiny", "--random-weights", "--out",
                 str(tmp_path / "rec2")]) == 0  # the default: ONNX Runtime on a CPU, float32 whatever the CPU
    assert "note: precision: float32 (auto: the onnxruntime backend runs float32); backend: onnxruntime" in (
        capsys.readouterr().err)


def test_every_inference_command_takes_precision():
    from dualtoken.cli.main import build_parser

    subparsers = next(a for a in build_parser()._actions if a.dest == "command").choices
    for command in ("encode", "decode", "reconstruct", "demo", "eval", "serve", "chat", "generate"):
        options = {s for action in subparsers[command]._actions for s in action.option_strings}
        assert "--precision" in options and "--backend" in options, command
        assert subparsers[command].get_default("precision") == "auto"
        assert subparsers[command].get_default("backend") == "auto"


def test_gram_search_settings_are_checked():
    from dualtoken.config import QuantizerConfig

    with pytest.raises(ConfigError, match="search_gram_max_mib"):
        QuantizerConfig(search_gram_max_mib=-1)
    assert QuantizerConfig().search_gram_min_dim == 64
