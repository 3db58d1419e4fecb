"""The embedded MLLM ``dualtoken-mllm-cifar10``: loaded by name offline, chat and generate through the command line
in a fresh process, a damaged installation named in one line, and (slow) its answers and drawings on CIFAR-10."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors import safe_open

from dualtoken import DualTokenizer, list_mllms, list_models, registry
from dualtoken.cli.main import main
from dualtoken.errors import DamagedInstallError
from dualtoken.mllm import DualTokenMLLM

REPO = Path(__file__).resolve().parents[2]
CIFAR = REPO.parent / "shared" / "data" / "cifar10"
NAME = "dualtoken-mllm-cifar10"
SHIPPED = REPO / "src" / "dualtoken" / "pretrained" / NAME
JUDGE_IMAGES = 1000  # real training images behind the judge of drawings (the recipe: 2,000; see the slow test)
CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO / "src")}


@pytest.fixture(scope="module")
def shipped() -> DualTokenMLLM:
    return DualTokenMLLM.from_pretrained(NAME)


def test_it_loads_by_name_with_the_embedded_tokenizer_at_128_px(shipped):
    assert NAME in list_mllms() and NAME not in list_models()  # not a tokenizer name
    assert shipped.config.tokenizer == "dualtoken-efflite0" and shipped.config.tokenizer_image_size == 128
    assert shipped.image_size == (128, 128) and shipped.depths == {"pixel": 4, "semantic": 8}  # reads every depth
    assert shipped.predict_depths == {"pixel": 2, "semantic": 2}  # draws the first 2 of each
    assert shipped.config.sampling.cfg_scale == 5.0  # its best measured guidance, the default of `generate`
    embedded = DualTokenizer.from_pretrained("dualtoken-efflite0").state_dict()
    for key, value in shipped.visual_tokenizer.state_dict().items():
        assert torch.equal(value, embedded[key]), key


def test_it_ships_float16_weights_under_15_mb_and_no_tokenizer_copy():
    files = [p for p in SHIPPED.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) <= 15 * 2**20
    assert not (SHIPPED / "tokenizer").exists()
    for weights in ("mllm.safetensors", "llm/model.safetensors"):
        with safe_open(str(SHIPPED / weights), "pt") as f:
            dtypes = {f.get_slice(k).get_dtype() for k in f.keys()}
        assert dtypes == {"F16"}, (weights, dtypes)


def test_saving_it_writes_a_self_contained_folder_with_the_tokenizer_at_128_px(shipped, tmp_path):
    path = shipped.save_pretrained(tmp_path / "copy")
    saved = json.loads((path / "mllm_config.json").read_text())
    assert saved["tokenizer"] == "tokenizer" and saved["tokenizer_image_size"] is None  # the copy is resized
    assert DualTokenMLLM.from_pretrained(path).image_size == (128, 128)


def _run(*argv: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "dualtoken", *argv], capture_output=True, text=True, cwd=cwd, env=ENV, timeout=300
    )


def test_chat_and_generate_answer_through_the_command_line(tmp_path):
    horse = tmp_path / "horse.png"
    drawn = _run("generate", "--model", NAME, "Draw a horse.", "--out", str(horse), cwd=tmp_path)
    assert drawn.returncode == 0, drawn.stderr
    assert Image.open(horse).size == (128, 128)
    asked = _run("chat", "--model", NAME, "--image", str(horse), "What is in this image?", cwd=tmp_path)
    assert asked.returncode == 0, asked.stderr
    answer = asked.stdout.strip()
    assert answer.startswith("It is a") and any(name in answer for name in CLASSES), answer


@pytest.fixture
def damaged(tmp_path, monkeypatch) -> Path:
    """A copy of the package's pretrained/ folder that the registry reads instead; damage it in the test."""
    copy = tmp_path / "pretrained"
    shutil.copytree(SHIPPED.parent, copy)
    real = registry._package_dir
    monkeypatch.setattr(registry, "_package_dir", lambda sub: copy if sub == "pretrained" else real(sub))
    return copy / NAME


@pytest.mark.parametrize("file", ["mllm.safetensors", "llm/model.safetensors", "mllm_config.json"])
@pytest.mark.parametrize("damage", ["missing", "corrupted"])
def test_a_damaged_file_is_named_with_how_to_reinstall(damaged, file, damage, capsys):
    path = damaged / file
    if damage == "missing":
        path.unlink()
    else:
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0xFF  # one flipped byte in the middle: the file still parses
        path.write_bytes(bytes(data))
    with pytest.raises(DamagedInstallError, match=f"{path}.*{damage}.*pip install --force-reinstall dualtoken"):
        DualTokenMLLM.from_pretrained(NAME)
    assert main(["generate", "Draw a cat.", "--out", str(damaged / "cat.png")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and str(path) in err and "make install" in err
    assert not (damaged / "cat.png").exists()


def test_an_empty_prompt_is_one_line_and_exit_2(tmp_path, capsys):
    assert main(["generate", "  ", "--out", str(tmp_path / "x.png")]) == 2
    assert capsys.readouterr().err.strip() == 'dualtoken generate: error: empty prompt: say what to draw, e.g. "Draw a horse."'
    assert not (tmp_path / "x.png").exists()

def _recipe():
    spec = importlib.util.spec_from_file_location("mllm_cifar_run", REPO / "recipes" / "mllm_cifar" / "run.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
@pytest.mark.data
@pytest.mark.skipif(not CIFAR.is_dir(), reason="no ../shared/data/cifar10")
def test_it_answers_70_percent_and_guided_drawings_show_the_class_40_percent(shipped, tmp_path):
    """Issue 32's shipping bars: answers on the first 200 CIFAR-10 test images, and 100 drawings (10 per class,
    seeds 0 and 1, the model's default guidance 5) judged by the recipe's independent judge, logistic regression on
    EfficientNet-Lite0 features of real training images.

    The judge is trained on the first JUDGE_IMAGES = 1,000 training images, not the recipe's 2,000: the judge's
    features are most of this test's time (about 3 minutes in all on the shared 2-core CPU). Measured here on the
    shipped float16 model: 73.5 % answers and 57.0 % of the 100 drawings (the recipe's evaluation of the float32
    model it was converted from: 74.7 % of the 10,000 test images, 53.0 % of 200 drawings at guidance 5 with the
    2,000-image judge; docs/RESULTS.md). The bars sit below both."""
    from dualtoken.features import EfficientNetFeatures
    from dualtoken.io import load_image
    from dualtoken.mllm import generate_images
    from dualtoken.mllm.generation import answer

    recipe = _recipe()
    cfg = recipe.load_recipe(REPO / "recipes" / "mllm_cifar" / "prefix.json", [
        f"data={CIFAR}", f"work={tmp_path}", f"judge_train_images={JUDGE_IMAGES}", "probe_steps=100"])
    test = recipe.extract_split(cfg, "test", 200, tmp_path / "images" / "test")
    recipe.extract_split(cfg, "train", JUDGE_IMAGES, tmp_path / "images" / "train")
    ids = sorted(test)
    images = torch.stack([load_image(tmp_path / "images" / "test" / f"{i}.png", shipped.image_size) for i in ids])
    labels = torch.tensor([test[i] for i in ids])
    names = recipe.class_names(cfg)
    right = 0
    with torch.inference_mode():
        for start in range(0, len(ids), 50):
            tokens = shipped.visual_tokenizer.encode(images[start : start + 50])
            texts = answer(shipped, [recipe.QUESTION] * len(tokens.pixel), (tokens.pixel, tokens.semantic))
            right += sum(recipe.parse_answer(t, names) == int(c) for t, c in zip(texts, labels[start : start + 50]))
    accuracy = right / len(ids)

    referee = recipe.judge(tmp_path, cfg, shipped.image_size)
    requested = torch.arange(10).repeat_interleave(10)
    with torch.inference_mode():
        drawn = torch.cat([
            generate_images(shipped, [f"Draw {recipe.with_article(names[int(c)])}." for c in chunk], seed=s).images
            for s, chunk in enumerate(requested.split(50))
        ]).clamp(-1, 1)
        judged = referee.predict(recipe.image_features(EfficientNetFeatures(), drawn, 50, "drawn"))
    drawing = float((judged == requested).float().mean())
    (tmp_path / "figures.json").write_text(json.dumps({"answers": accuracy, "drawings": drawing}))
    print(f"answers {accuracy:.1%} of {len(ids)}; drawings judged the requested class {drawing:.1%} of 100")
    assert accuracy >= 0.70
    assert drawing >= 0.40


