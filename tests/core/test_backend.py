"""The onnxruntime backend behind DualTokenizer.encode / decode: same codes (exact search on its latents), decoded
images within 1e-4 of eager, chosen by one setting, falling back to eager with one warning where it cannot start."""

from __future__ import annotations

import warnings

import pytest
import torch

from dualtoken import backend as backend_module
from dualtoken.backend import BackendWarning, check_backend, explain_backend, resolve_backend, runtime_for
from dualtoken.cli.main import main
from dualtoken.errors import ConfigError


def test_onnxruntime_gives_eager_codes_and_images(tiny_tokenizer, tiny_images):
    eager = tiny_tokenizer.encode(tiny_images, precision="fp32", backend="torch")
    fast = tiny_tokenizer.encode(tiny_images, backend="onnxruntime")
    assert tiny_tokenizer._runtime_state["runtime"] is not None  # the graphs really ran
    assert (fast.pixel != eager.pixel).float().mean() <= 0.001
    assert (fast.semantic != eager.semantic).float().mean() <= 0.001
    for depth in (1, tiny_tokenizer.pixel_depth):  # any prefix of depths
        codes = eager.pixel[..., :depth]
        reference = tiny_tokenizer.decode(codes, precision="fp32", backend="torch")
        with torch.no_grad():
            decoded = tiny_tokenizer.decode(codes, backend="onnxruntime")
        assert decoded.shape == reference.shape and decoded.dtype == torch.float32
        assert (decoded - reference).abs().max() < 1e-4


def test_the_runtime_follows_the_weights(tiny_tokenizer, tiny_images):
    codes = tiny_tokenizer.encode(tiny_images, precision="fp32", backend="torch").pixel
    with torch.no_grad():
        before = tiny_tokenizer.decode(codes, backend="onnxruntime")
        tiny_tokenizer.decoder.conv_out.bias.add_(0.5)  # a weight changed in place: the graphs must follow
        after = tiny_tokenizer.decode(codes, backend="onnxruntime")
        eager = tiny_tokenizer.decode(codes, precision="fp32", backend="torch")
    assert (after - before).abs().max() > 0.4
    assert (after - eager).abs().max() < 1e-4


def test_training_mode_and_gradients_stay_eager(tiny_tokenizer, tiny_images):
    codes = tiny_tokenizer.encode(tiny_images).pixel
    assert runtime_for(tiny_tokenizer.train(), torch.device("cpu"), "auto", "auto") is None
    tiny_tokenizer.eval()
    image = tiny_tokenizer.decode(codes, backend="onnxruntime")  # grad enabled, decoder weights require grad
    image.sum().backward()
    assert tiny_tokenizer.decoder.conv_out.bias.grad is not None


def test_the_setting_is_checked_and_explained():
    with pytest.raises(ConfigError, match="unknown backend 'tensorrt'; expected one of auto, torch, onnxruntime"):
        check_backend("tensorrt")
    assert resolve_backend("auto", "cpu", "auto") == "onnxruntime"
    assert resolve_backend("auto", "cpu", "bf16") == "torch"  # an explicit bf16 asks for PyTorch's autocast
    assert resolve_backend("torch", "cpu", "auto") == "torch"
    assert resolve_backend("auto", "meta", "auto") == "torch"  # GPUs (any non-CPU device) keep PyTorch
    with pytest.raises(ConfigError, match="runs float32"):
        resolve_backend("onnxruntime", "cpu", "bf16")
    assert explain_backend("auto", "cpu").startswith("onnxruntime (auto: ONNX Runtime ")


def test_backend_not_installed(monkeypatch):
    monkeypatch.setattr(backend_module, "onnxruntime_available", lambda: False)
    with pytest.raises(ConfigError, match="backend onnxruntime is not installed"):
        check_backend("onnxruntime")
    assert explain_backend("auto", "cpu") == "torch (auto: onnxruntime is not installed)"


def test_a_runtime_that_cannot_start_falls_back_with_one_warning(tiny_tokenizer, tiny_images, monkeypatch, tmp_path):
    monkeypatch.setenv("DUALTOKEN_CACHE", str(tmp_path))  # nothing exported yet

    def broken(tokenizer, path):
        raise RuntimeError("Exporting the operator 'aten::frobnicate' to ONNX opset version 17 is not supported.\nmore")

    monkeypatch.setattr("dualtoken.export.export_taps_graph", broken)
    eager = tiny_tokenizer.encode(tiny_images, precision="fp32", backend="torch")
    with pytest.warns(BackendWarning, match=r"backend: torch \(onnxruntime could not start: RuntimeError: Export"):
        fallback = tiny_tokenizer.encode(tiny_images, precision="fp32", backend="auto")
    assert torch.equal(fallback.pixel, eager.pixel)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # said once, not at every call
        tiny_tokenizer.encode(tiny_images, precision="fp32", backend="auto")
    tiny_tokenizer.__dict__.pop("_runtime_state")
    with pytest.raises(ConfigError, match="backend onnxruntime could not start"):
        tiny_tokenizer.encode(tiny_images, backend="onnxruntime")


@pytest.fixture
def photo_dir(tmp_path):
    import numpy as np
    from PIL import Image

    folder = tmp_path / "photos"
    folder.mkdir()
    for index in range(2):
        pixels = np.random.default_rng(index).integers(0, 255, (8, 8, 3), dtype=np.uint8)
        Image.fromarray(pixels).resize((64, 64), Image.BILINEAR).save(folder / f"{index}.png")
    return folder


def test_cli_backends_agree_and_say_what_they_run(photo_dir, tmp_path, capsys):
    from dualtoken.tokenfile import load_tokens

    runs = {}
    for backend in ("auto", "torch"):
        out = tmp_path / f"{backend}.safetensors"
        assert main(["encode", str(photo_dir), "--model", "dualtoken-tiny", "--random-weights", "--backend",
                     backend, "--precision", "fp32", "--out", str(out)]) == 0
        runs[backend] = load_tokens(out)
        err = capsys.readouterr().err
        assert err.count("backend: ") == 1
        assert ("backend: onnxruntime (auto: ONNX Runtime" in err) == (backend == "auto")
    assert (runs["auto"].pixel != runs["torch"].pixel).float().mean() <= 0.001


@pytest.mark.parametrize("value, message", [("tensorrt", "unknown backend 'tensorrt'"),
                                            ("onnxruntime --precision bf16", "runs float32")])
def test_cli_backend_errors_are_one_line_and_exit_2(value, message, photo_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("dualtoken.precision.cpu_has_bf16_matmul", lambda: True)
    args = ["encode", str(photo_dir), "--model", "dualtoken-tiny", "--random-weights", "--out",
            str(tmp_path / "t.safetensors"), "--backend", *value.split()]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0] and err[0].startswith("dualtoken encode: error:")


@pytest.mark.data
def test_shipped_model_on_kodak(shared_data):
    """The rule of the issue on real photos: at most 0.1 % of codes differ, decoded images within 1e-4."""
    from dualtoken import DualTokenizer
    from dualtoken.io import list_images, load_image

    tokenizer = DualTokenizer.from_pretrained("dualtoken-efflite0")
    images = torch.stack([load_image(p, tokenizer.image_size) for p in list_images(shared_data / "kodak")[:8]])
    with torch.inference_mode():
        eager = tokenizer.encode(images, precision="fp32", backend="torch")
        fast = tokenizer.encode(images, backend="onnxruntime")
        assert (fast.pixel != eager.pixel).float().mean() <= 0.001
        assert (fast.semantic != eager.semantic).float().mean() <= 0.001
        reference = tokenizer.decode(eager.pixel, precision="fp32", backend="torch")
        assert (tokenizer.decode(eager.pixel, backend="onnxruntime") - reference).abs().max() < 1e-4


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_a_batch_split_across_threads_gives_what_one_image_at_a_time_gives(tiny_tokenizer, tiny_images, threads):
    images = torch.cat([tiny_images, tiny_images.flip(-1), tiny_images.flip(-2)])  # (6, 3, H, W)
    codes = tiny_tokenizer.encode(images, precision="fp32", backend="torch").pixel
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        runtime = backend_module.OnnxRuntime(tiny_tokenizer.eval())
        assert {threads, 1} == {t for _, t in runtime.sessions}
        for batch in (1, 2, 5, 6):  # below, at and above the thread count: whole or split
            latents = runtime.latents(images[:batch])
            decoded = runtime.decode(codes[:batch])
            one_by_one = [runtime.latents(images[i : i + 1]) for i in range(batch)]
            for branch in (0, 1):
                expected = torch.cat([parts[branch] for parts in one_by_one])
                torch.testing.assert_close(latents[branch], expected, rtol=0, atol=1e-5)
            expected = torch.cat([runtime.decode(codes[i : i + 1]) for i in range(batch)])
            torch.testing.assert_close(decoded, expected, rtol=0, atol=1e-5)
    finally:
        torch.set_num_threads(before)
