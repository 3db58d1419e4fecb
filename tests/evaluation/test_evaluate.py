"""End-to-end evaluation: the report's schema and files, rate-distortion, zero-shot, shards, the CLI."""

import json

import pytest
import torch

from dualtoken import DualTokenizer, get_config
from dualtoken.cli.main import main
from dualtoken.config import apply_overrides
from dualtoken.evaluation import REQUIRED_KEYS, SCHEMA, EvalConfig, evaluate

from .conftest import CLASS_NAMES, write_images

FAST = EvalConfig(batch_size=4, kid_subsets=5, kid_subset_size=3, grid_images=1)


@pytest.mark.slow
def test_report_schema_files_and_numbers(tiny_tokenizer, image_folder, tmp_path):
    out = tmp_path / "out"
    report = evaluate(tiny_tokenizer, image_folder, out, FAST, progress=False)
    assert set(REQUIRED_KEYS) <= set(report) and report["schema"] == SCHEMA
    for name in ("report.json", "report.md", "rate_distortion.png", "codebook_usage.png", "reconstruction_grid.png"):
        assert (out / name).is_file(), name
    assert json.loads((out / "report.json").read_text()) == json.loads(json.dumps(report))
    assert set(report["figures"].values()) == {"rate_distortion.png", "codebook_usage.png", "reconstruction_grid.png"}

    metrics = report["metrics"]
    for name in ("psnr", "ssim", "perceptual_efficientnet_lite0", "fd_efficientnet_lite0", "kid_efficientnet_lite0",
                 "unquantized_cosine_tokens", "unquantized_cosine_pooled"):
        assert isinstance(metrics[name], float), name
    # without local weights the standard names never appear, and the report says why
    assert not any(name.startswith(("rfid", "lpips")) for name in metrics)
    assert {"rfid", "lpips", "teacher", "classification"} <= set(report["skipped_metrics"])

    data = report["data"]
    assert data["num_images"] == 5 and len(data["fingerprint"]) == 64
    q, (h, w) = tiny_tokenizer.pixel_depth, tiny_tokenizer.grid
    assert [row["depth"] for row in report["rate_distortion"]["pixel"]] == list(range(1, q + 1))
    assert report["rate_distortion"]["pixel"][-1]["psnr"] == metrics["psnr"]
    for branch in ("pixel", "semantic"):
        book = report["codebooks"][branch]
        assert len(book["per_depth"]) == q and all(d["tokens"] == 5 * h * w for d in book["per_depth"])
        assert book["all_depths"]["tokens"] == 5 * h * w * q
        assert all(0.0 <= d["agreement"] <= 1.0 for d in report["stability"][branch])
        prefix = [d["prefix_agreement"] for d in report["stability"][branch]]
        assert prefix == sorted(prefix, reverse=True)  # agreeing on depths 1..q is harder than on 1..q-1
    best, worst = report["extremes"]["best"][0], report["extremes"]["worst"][0]
    assert best["psnr"] >= worst["psnr"]
    protocol = report["protocol"]
    assert protocol["reconstruction"]["jpeg_round_trip"] is False and "bicubic" in protocol["preprocessing"]["resize"]
    markdown = (out / "report.md").read_text()
    assert "| psnr |" in markdown and "Rate-distortion" in markdown and "Codebook usage" in markdown


def test_fingerprint_follows_the_pixels(tiny_tokenizer, image_folder):
    config = EvalConfig(metrics=("codebook",), batch_size=5)
    first = evaluate(tiny_tokenizer, image_folder, None, config, progress=False)["data"]["fingerprint"]
    assert evaluate(tiny_tokenizer, image_folder, None, config, progress=False)["data"]["fingerprint"] == first
    write_images(image_folder, 1, seed=9)  # overwrite img00.png with other pixels
    assert evaluate(tiny_tokenizer, image_folder, None, config, progress=False)["data"]["fingerprint"] != first


def test_rate_distortion_is_monotone_when_deeper_codes_reduce_the_residual(residual_tokenizer, image_folder):
    config = EvalConfig(metrics=("reconstruction", "rate_distortion"), batch_size=5)
    rows = evaluate(residual_tokenizer, image_folder, None, config, progress=False)["rate_distortion"]["pixel"]
    psnr, ssim = [row["psnr"] for row in rows], [row["ssim"] for row in rows]
    assert len(rows) == residual_tokenizer.pixel_depth
    assert all(a < b for a, b in zip(psnr, psnr[1:], strict=False)), psnr
    assert all(a <= b + 1e-6 for a, b in zip(ssim, ssim[1:], strict=False)), ssim


def test_zero_shot_through_the_quantized_path(tiny_siglip_dir, labelled_folder, tmp_path):
    config = apply_overrides(get_config("dualtoken-tiny"), [f"backbone.pretrained={tiny_siglip_dir}"])
    torch.manual_seed(0)
    tokenizer = DualTokenizer.from_config(config, backbone_path=tiny_siglip_dir).eval()
    eval_config = EvalConfig(metrics=("semantic", "rate_distortion"), batch_size=4,
                             classifier_cache=str(tmp_path / "cache"))
    report = evaluate(tokenizer, labelled_folder / "images", None, eval_config, progress=False)
    metrics = report["metrics"]
    assert report["data"]["labeled_images"] == 4 and report["classifier"]["num_classes"] == len(CLASS_NAMES)
    for name in ("zeroshot_top1", "zeroshot_top5", "zeroshot_top1_unquantized", "zeroshot_top1_teacher",
                 "zeroshot_top1_gap", "teacher_cosine_tokens", "teacher_cosine_pooled"):
        assert name in metrics, name
    assert metrics["zeroshot_top5"] == 1.0  # 3 classes: the top 5 always hold the label
    assert metrics["zeroshot_top1_gap"] == metrics["zeroshot_top1"] - metrics["zeroshot_top1_unquantized"]
    # the backbone was loaded from the teacher's weights: unquantized model and teacher agree exactly
    assert metrics["zeroshot_top1_unquantized"] == metrics["zeroshot_top1_teacher"]
    assert metrics["teacher_cosine_tokens"] == metrics["unquantized_cosine_tokens"]
    assert [row["depth"] for row in report["rate_distortion"]["semantic"]] == [1, 2, 3, 4]
    assert len(list((tmp_path / "cache").glob("classifier-*.safetensors"))) == 1
    # the protocol describes what ran: this zero-shot classifier, and no pixel path (its groups were not asked for)
    assert "80 OpenAI templates" in report["protocol"]["semantic"]["classifier"]
    assert not {"reconstruction", "features", "stability"} & set(report["protocol"])


def test_webdataset_shards_with_labels(tiny_tokenizer, tmp_path):
    import io

    import webdataset as wds
    from PIL import Image

    paths = write_images(tmp_path / "png", 3)
    with wds.TarWriter(str(tmp_path / "eval-000000.tar")) as sink:
        for i, path in enumerate(paths):
            buffer = io.BytesIO()
            Image.open(path).save(buffer, format="PNG")
            sink.write({"__key__": f"sample{i}", "png": buffer.getvalue(), "cls": str(i % 2).encode()})
    config = EvalConfig(metrics=("reconstruction",), batch_size=2)
    report = evaluate(tiny_tokenizer, str(tmp_path / "eval-000000.tar"), None, config, progress=False)
    assert report["data"]["num_images"] == 3 and "cls" in report["data"]["labels"]
    assert report["data"]["labeled_images"] == 3
    from_folder = evaluate(tiny_tokenizer, tmp_path / "png", None, config, progress=False)
    assert report["metrics"]["psnr"] == from_folder["metrics"]["psnr"]  # same pixels, same numbers


def test_cli_writes_a_report_and_reports_bad_input(tiny_tokenizer, image_folder, tmp_path, capsys):
    model = tiny_tokenizer.save_pretrained(tmp_path / "model")
    out = tmp_path / "cli"
    code = main(["eval", "--model", str(model), "--data", str(image_folder), "--out", str(out), "--metrics",
                 "reconstruction", "codebook", "--batch-size", "5", "--no-progress"])
    assert code == 0 and (out / "report.json").is_file()
    report = json.loads((out / "report.json").read_text())
    assert report["config"]["metrics"] == ["reconstruction", "codebook"] and "psnr" in report["metrics"]
    assert "evaluated 5 images" in capsys.readouterr().out
    assert main(["eval", "--model", str(model), "--data", str(tmp_path / "none"), "--out", str(out)]) == 2
    assert main(["eval", "--model", str(model), "--data", str(image_folder), "--out", str(out),
                 "--set", "kid_subsets=0"]) == 2
    assert "kid_subsets" in capsys.readouterr().err


@pytest.mark.slow
def test_an_interrupted_run_resumes_where_it_stopped(tiny_tokenizer, image_folder, tmp_path, monkeypatch):
    from dualtoken.errors import ConfigError
    from dualtoken.evaluation import runner

    config = EvalConfig(metrics=("reconstruction", "distribution", "codebook"), batch_size=2, checkpoint_every=1,
                        kid_subsets=5, kid_subset_size=3)
    reference = evaluate(tiny_tokenizer, image_folder, tmp_path / "whole", config, progress=False)
    assert not list((tmp_path / "whole" / ".partial").glob("*.pt"))  # removed once complete

    original, seen = runner.Evaluator.update, []

    def interrupted(self, batch):
        if len(seen) == 4:  # stop in the third batch, after two were saved
            raise KeyboardInterrupt
        seen.extend(batch.indices.tolist())
        original(self, batch)

    monkeypatch.setattr(runner.Evaluator, "update", interrupted)
    with pytest.raises(KeyboardInterrupt):
        evaluate(tiny_tokenizer, image_folder, tmp_path / "resumed", config, progress=False)
    assert (tmp_path / "resumed" / ".partial" / "rank0-of-1.pt").is_file()

    seen.clear()
    monkeypatch.setattr(runner.Evaluator, "update", lambda self, batch: (seen.extend(batch.indices.tolist()),
                                                                         original(self, batch)))
    with pytest.raises(ConfigError, match="partial evaluation"):  # other settings: not mixed in
        evaluate(tiny_tokenizer, image_folder, tmp_path / "resumed", EvalConfig(metrics=("codebook",)))
    resumed = evaluate(tiny_tokenizer, image_folder, tmp_path / "resumed", config, progress=False)
    assert seen == [4]  # images 0..3 came from the saved state
    for key in ("metrics", "rate_distortion", "codebooks", "extremes"):
        assert resumed[key] == reference[key], key
    assert resumed["data"]["fingerprint"] == reference["data"]["fingerprint"]


@pytest.mark.slow
def test_a_small_set_reports_each_image_once_and_says_what_needs_more(tiny_tokenizer, tmp_path):
    """6 images with the default 4 best + 4 worst and KID subsets of 1000: nothing may pretend otherwise."""
    write_images(tmp_path / "six", 6)
    out = tmp_path / "out"
    report = evaluate(tiny_tokenizer, tmp_path / "six", out, EvalConfig(batch_size=4, feature_resize=64), progress=False)
    best, worst = report["extremes"]["best"], report["extremes"]["worst"]
    assert len(best) == len(worst) == 3  # each image once, the better half as best
    assert {e["index"] for e in best}.isdisjoint(e["index"] for e in worst)
    assert min(e["psnr"] for e in best) >= max(e["psnr"] for e in worst)
    metrics, caveats = report["metrics"], report["caveats"]
    assert isinstance(metrics["kid_efficientnet_lite0"], float) and "kid_efficientnet_lite0_std" not in metrics
    assert "on 6 images" in caveats["kid_efficientnet_lite0"] and "no spread" in caveats["kid_efficientnet_lite0"]
    assert "on 6 images" in caveats["fd_efficientnet_lite0"]
    assert "Read with care:" in (out / "report.md").read_text()
    # the protocol lists what ran: no Inception without its weights, and no classifier the model lacks
    assert set(report["protocol"]["features"]) == {"efficientnet_lite0"}
    assert report["protocol"]["semantic"]["classifier"].startswith("no classification")
    # the per-image table beside report.json
    assert report["tables"] == {"per_image": "per_image.csv"}
    lines = (out / "per_image.csv").read_text().splitlines()
    assert lines[0] == "image,psnr,ssim,psnr@1,psnr@2,psnr@3,psnr@4" and len(lines) == 7
    psnr = [float(line.split(",")[1]) for line in lines[1:]]
    assert sum(psnr) / 6 == pytest.approx(metrics["psnr"], abs=1e-3)
    assert all(float(line.split(",")[6]) == float(line.split(",")[1]) for line in lines[1:])  # psnr@4 = full depth


def test_the_protocol_of_a_head_classifier_run_names_the_head():
    from dualtoken.evaluation.protocol import describe_protocol

    protocol = describe_protocol((256, 256), 224, {"semantic"}, [], "head")
    assert protocol["semantic"]["classifier"].startswith("the backbone's own ImageNet-1k classifier head")
    assert "templates" not in json.dumps(protocol) and "features" not in protocol
