"""The benchmark-harness requests on a DualToken MLLM (dualtoken.mllm.harness), the tiny CIFAR-10 task, and the
lmms-eval run end to end where lmms-eval is installed (docs/MLLM.md "Standard benchmarks")."""

from __future__ import annotations

import importlib.metadata
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

from dualtoken.errors import CheckpointError, DataError, ImageError
from dualtoken.io import to_tensor, to_uint8
from dualtoken.mllm import MLLMBatch, answer
from dualtoken.mllm.harness import Question, generate_until, load_mllm, loglikelihood, token_loglikelihood
from dualtoken.mllm.harness.__main__ import main as harness_main
from dualtoken.mllm.harness.cifar_task import doc_to_visual, process_results, write_cifar_task
from dualtoken.mllm.prompt import IGNORE

CLASSES = ["airplane", "cat", "dog", "ship"]
HAS_LMMS_EVAL = importlib.util.find_spec("lmms_eval") is not None


def _pil(image: torch.Tensor) -> Image.Image:
    return Image.fromarray(to_uint8(image))


def _tensor(images: list[Image.Image]) -> torch.Tensor:
    """PIL images at the tiny tokenizer's 64x64 -> (B, 3, 64, 64) in [-1, 1]."""
    return torch.stack([to_tensor(image) for image in images])


@pytest.fixture
def model(make_mllm):
    return make_mllm(seed=0).eval()


@pytest.fixture
def pictures(tiny_images) -> list[Image.Image]:
    return [_pil(image) for image in tiny_images]


def _images_folder(folder: Path, count: int) -> Path:
    """``count`` random 32x32 PNGs with labels.json, like the CIFAR recipe's image folders."""
    folder.mkdir(parents=True)
    generator = torch.Generator().manual_seed(1)
    labels = {}
    for i in range(count):
        pixels = torch.randint(0, 256, (32, 32, 3), generator=generator, dtype=torch.uint8)
        Image.fromarray(pixels.numpy()).save(folder / f"test_{i:05d}.png")
        labels[f"test_{i:05d}"] = i % len(CLASSES)
    (folder / "labels.json").write_text(json.dumps(labels))
    return folder


# ----------------------------------------------------------------------------------------------------------------
# the two request kinds
# ----------------------------------------------------------------------------------------------------------------


def test_loglikelihood_is_the_training_loss_on_the_continuation(model, pictures, tiny_tokenizer):
    question, continuation = "What is in this image?", "It is a dog."
    [(score, _)] = loglikelihood(model, [Question(question, pictures[:1])], [continuation])
    context = model.prompt.chat_prompt(question, 1)
    target = model.prompt.text(continuation)
    ids = torch.tensor([context + target])
    labels = torch.full_like(ids, IGNORE)
    labels[0, len(context) :] = torch.tensor(target)
    codes = tiny_tokenizer.encode(_tensor(pictures[:1]))
    batch = MLLMBatch(ids, torch.ones_like(ids), labels, codes.pixel, codes.semantic, torch.tensor([False]))
    with torch.no_grad():
        text_loss = model(batch).text  # mean cross-entropy over the continuation's tokens
    assert score < 0
    assert score == pytest.approx(-float(text_loss) * len(target), rel=1e-4)


def test_loglikelihood_batches_and_pads_without_changing_scores(model, pictures):
    questions = [Question("What is in this image?", pictures[:1]), Question("Name it.", pictures[1:])]
    questions.append(Question("Say something.", []))
    continuations = ["It is a cat.", "A ship", "It is a dog and a cat, I think."]
    together = loglikelihood(model, questions, continuations, batch_size=3)
    alone = [loglikelihood(model, [q], [c])[0] for q, c in zip(questions, continuations)]
    for (a, greedy_a), (b, greedy_b) in zip(together, alone):
        assert a == pytest.approx(b, rel=1e-4, abs=1e-4) and greedy_a == greedy_b
    # the image is read: another image gives another score
    other = loglikelihood(model, [Question("What is in this image?", pictures[1:])], ["It is a cat."])[0][0]
    assert other != pytest.approx(together[0][0], abs=1e-4)


def test_greedy_flag_marks_the_most_likely_token_and_generation_picks_it(model, pictures):
    question = Question("What is in this image?", pictures[:1])
    tokenizer = model.text_tokenizer
    tokens = [t for t in range(len(tokenizer)) if t != model.prompt.slot_id]  # every one-token continuation
    scored = token_loglikelihood(model, [question] * len(tokens), [[t] for t in tokens], batch_size=64)
    scores = torch.tensor([s for s, _ in scored])
    assert 0.95 < float(scores.exp().sum()) <= 1.0 + 1e-4  # one distribution (less the slot token's share)
    best = tokens[int(scores.argmax())]
    assert [greedy for _, greedy in scored] == [t == best for t in tokens]
    text = "" if best == tokenizer.eos_token_id else tokenizer.decode([best])
    assert generate_until(model, [question], max_new_tokens=1) == [text.split(model.prompt.stop_text)[0].strip()]


def test_generate_until_answers_like_chat_and_keeps_the_order(model, pictures, tiny_tokenizer):
    questions = [
        Question("What is in this image?", pictures[:1]),
        Question("What is in this image?", []),
        Question("Which animal?", pictures[1:]),
    ]
    got = generate_until(model, questions, max_new_tokens=6, batch_size=2)
    codes = tiny_tokenizer.encode(_tensor(pictures))
    expected = answer(model, ["What is in this image?", "Which animal?"], (codes.pixel, codes.semantic), max_new_tokens=6)
    assert got[0] == expected[0].strip() and got[2] == expected[1].strip()
    assert got[1] == answer(model, ["What is in this image?"], None, max_new_tokens=6)[0].strip()
    # stop strings cut the answer
    stop = got[0][len(got[0]) // 2 :]
    cut = generate_until(model, questions[:1], until=["never there", stop], max_new_tokens=6)
    assert cut == [got[0][: got[0].find(stop)].strip()] and len(cut[0]) < len(got[0])


def test_bad_requests_raise_typed_errors(model, pictures, tmp_path):
    with pytest.raises(DataError, match="doc 7: 2 images"):
        generate_until(model, [Question("Compare.", pictures, where="doc 7")])
    with pytest.raises(DataError, match="empty continuation"):
        loglikelihood(model, [Question("Hi.", [])], [""])
    with pytest.raises(DataError, match="slot token"):
        loglikelihood(model, [Question("Hi.", [])], [model.config.prompt.image_slot])
    with pytest.raises(CheckpointError, match="not a DualToken MLLM folder"):
        load_mllm(tmp_path / "nowhere")
    (tmp_path / "llm").mkdir()
    with pytest.raises(CheckpointError, match="not a DualToken MLLM folder"):
        load_mllm(tmp_path)


# ----------------------------------------------------------------------------------------------------------------
# the tiny task
# ----------------------------------------------------------------------------------------------------------------


def test_task_folder_documents_and_scoring(tmp_path):
    folder = write_cifar_task(_images_folder(tmp_path / "images", 6), CLASSES, tmp_path / "task", limit=5)
    docs = [json.loads(line) for line in (folder / "docs.jsonl").read_text().splitlines()]
    assert len(docs) == 5 and docs[1]["answer"] == "It is a cat." and docs[0]["answer"] == "It is an airplane."
    assert docs[2]["choices"].index(docs[2]["answer"]) == 2
    assert doc_to_visual(docs[0])[0].size == (32, 32)
    assert str((folder / "docs.jsonl").resolve()) in (folder / "dualtoken_cifar_mc.yaml").read_text()
    assert process_results(docs[1], ["It is a cat."]) == {"exact_match": 1.0, "class_named": 1.0}
    assert process_results(docs[1], ["A cat, or a dog"]) == {"exact_match": 0.0, "class_named": 1.0}
    assert process_results(docs[1], ["It is a dog."]) == {"exact_match": 0.0, "class_named": 0.0}


def test_task_with_missing_images_is_refused(tmp_path, capsys):
    images = _images_folder(tmp_path / "images", 3)
    (images / "test_00001.png").unlink()
    with pytest.raises(DataError, match="test_00001"):
        write_cifar_task(images, CLASSES, tmp_path / "task")
    # an image deleted after the task was written: the document's image names the file
    folder = write_cifar_task(_images_folder(tmp_path / "more", 2), CLASSES, tmp_path / "task2")
    doc = json.loads((folder / "docs.jsonl").read_text().splitlines()[0])
    Path(doc["image"]).unlink()
    with pytest.raises(ImageError, match="test_00000"):
        doc_to_visual(doc)
    # the command line: one line, exit 2
    classes = tmp_path / "classes.txt"
    classes.write_text("\n".join(CLASSES))
    code = harness_main(["task", "--images", str(images), "--classes", str(classes), "--out", str(tmp_path / "t3")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "test_00001" in err


def test_run_refuses_a_folder_that_is_not_an_mllm(tmp_path, capsys):
    code = harness_main(["run", "--model", str(tmp_path), "--tasks", "dualtoken_cifar_mc"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert ("not a DualToken MLLM folder" in err) if HAS_LMMS_EVAL else ("lmms-eval is not installed" in err)


@pytest.mark.skipif(HAS_LMMS_EVAL, reason="checks the package without lmms-eval")
def test_adapter_module_imports_without_lmms_eval_and_says_how_to_install_it(tmp_path):
    from dualtoken.mllm.harness import lmms as adapter

    with pytest.raises(ModuleNotFoundError, match="--no-deps lmms-eval==0.7.3"):
        adapter.DualTokenLMMS(pretrained=str(tmp_path))
    with pytest.raises(ModuleNotFoundError, match="lmms-eval is not installed"):
        adapter.manifest()


# ----------------------------------------------------------------------------------------------------------------
# lmms-eval end to end (where it is installed: pip install -e ".[harness]"; pip install --no-deps lmms-eval==0.7.3)
# ----------------------------------------------------------------------------------------------------------------


@pytest.fixture
def cifar_task(tmp_path, shared_data, cifar_recipe):
    """The task folder of the first 12 CIFAR-10 test images, extracted by the recipe's own prepare step."""
    cfg = cifar_recipe.RecipeConfig(data=str(shared_data / "cifar10"), work=str(tmp_path / "work"))
    images = tmp_path / "work" / "images" / "test"
    cifar_recipe.extract_split(cfg, "test", 12, images)
    names = (shared_data / "cifar10" / "classes.txt").read_text().split()
    return write_cifar_task(images, names, tmp_path / "task"), names


@pytest.fixture
def offline_hf(tmp_path, monkeypatch):
    for key, value in {"HF_HOME": tmp_path / "hf", "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}.items():
        monkeypatch.setenv(key, str(value))


@pytest.mark.data
@pytest.mark.skipif(not HAS_LMMS_EVAL, reason="lmms-eval is not installed (the harness extra, docs/MLLM.md)")
def test_lmms_eval_runs_the_tiny_task_with_the_dualtoken_model(
    make_mllm, tmp_path, cifar_task, offline_hf, capsys
):
    from dualtoken.mllm.harness.lmms import run_tasks

    folder, names = cifar_task
    model = make_mllm(seed=0).eval()
    saved = model.save_pretrained(tmp_path / "mllm")
    results = run_tasks(saved, ["dualtoken_cifar_mc", "dualtoken_cifar_qa"], include_path=folder, batch_size=5)

    # the harness's figures are those of the requests run directly
    docs = [json.loads(line) for line in (folder / "docs.jsonl").read_text().splitlines()]
    questions = [Question("What is in this image?", doc_to_visual(d)) for d in docs]
    choices = docs[0]["choices"]
    scores = torch.tensor(
        [[s for s, _ in loglikelihood(model, [q] * len(choices), choices)] for q in questions]
    )  # (docs, choices)
    expected_acc = float((scores.argmax(1) == torch.tensor([choices.index(d["answer"]) for d in docs])).float().mean())
    assert results["dualtoken_cifar_mc"]["acc,none"] == pytest.approx(expected_acc)
    answers = generate_until(model, questions, until=["\n"], max_new_tokens=16)
    expected_named = sum(process_results(d, [a])["class_named"] for d, a in zip(docs, answers)) / len(docs)
    assert results["dualtoken_cifar_qa"]["class_named,none"] == pytest.approx(expected_named)
    assert results["dualtoken_cifar_qa"]["exact_match,none"] == pytest.approx(
        sum(a == d["answer"] for d, a in zip(docs, answers)) / len(docs)
    )

    # an image gone since the task was written: one line naming it, exit 2
    Path(docs[0]["image"]).unlink()
    arguments = ["run", "--model", str(saved), "--include-path", str(folder), "--tasks", "dualtoken_cifar_qa"]
    assert harness_main(arguments) == 2
    err = capsys.readouterr().err  # lmms-eval's progress bars, then the error
    errors = [line for line in err.splitlines() if "error: " in line]
    assert len(errors) == 1 and Path(docs[0]["image"]).name in errors[0]
    assert "dualtoken.errors" not in err  # no traceback of the error


@pytest.mark.data
@pytest.mark.skipif(
    not HAS_LMMS_EVAL
    or not any(e.name == "dualtoken" for e in importlib.metadata.entry_points(group="lmms_eval.models"))
    or shutil.which("lmms-eval", path=os.path.dirname(sys.executable)) is None,
    reason="the lmms-eval command with dualtoken's entry point is not installed here",
)
def test_lmms_eval_command_finds_the_dualtoken_model(make_mllm, tmp_path, cifar_task, offline_hf):
    folder, _ = cifar_task
    saved = make_mllm(seed=0).save_pretrained(tmp_path / "mllm")
    command = [
        shutil.which("lmms-eval", path=os.path.dirname(sys.executable)), "--model", "dualtoken",
        "--model_args", f"pretrained={saved}", "--tasks", "dualtoken_cifar_mc", "--include_path", str(folder),
        "--limit", "4", "--output_path", str(tmp_path / "out"),
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, env=dict(os.environ))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "dualtoken_cifar_mc" in done.stdout and "acc" in done.stdout, done.stdout[-3000:]
    assert "Traceback" not in done.stdout + done.stderr, (done.stdout + done.stderr)[-3000:]
