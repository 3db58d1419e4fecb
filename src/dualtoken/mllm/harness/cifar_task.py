"""A tiny lmms-eval task of our own, from CIFAR-10 test images, readable offline (docs/MLLM.md "Standard benchmarks").

``write_cifar_task`` turns a folder of images with ``labels.json`` ({image id: class index}, what the CIFAR recipe's
``prepare`` stage writes to ``<work>/images/test``) into an lmms-eval task folder:

    docs.jsonl                 one document per image: its path, class name, answer sentence
    dualtoken_cifar_mc.yaml    multiple choice: the log-likelihood of each of the 10 answer sentences ("acc")
    dualtoken_cifar_qa.yaml    short answer: the generated answer, exact ("exact_match") and by class ("class_named")
    utils.py                   the task's functions, imported from this module

The documents load through the ``datasets`` library's local JSON loader, so no hub access is needed. Run with
``--include_path <folder> --tasks dualtoken_cifar_mc,dualtoken_cifar_qa``.
"""

from __future__ import annotations

import json
from pathlib import Path

from PIL import Image

from ...errors import DataError
from ...io import open_rgb

TASKS = ("dualtoken_cifar_mc", "dualtoken_cifar_qa")
QUESTION = "What is in this image?"


def with_article(noun: str) -> str:
    """'a horse', 'an airplane' (enough for CIFAR-10)."""
    return f"{'an' if noun[0].lower() in 'aeiou' else 'a'} {noun}"


def answer_sentence(name: str) -> str:
    """The answer form the CIFAR recipe teaches: "It is a horse."."""
    return f"It is {with_article(name)}."


# ----------------------------------------------------------------------------------------------------------------
# the task's functions (utils.py of the written folder imports these)
# ----------------------------------------------------------------------------------------------------------------


def doc_to_visual(doc: dict) -> list[Image.Image]:
    """The document's image; a missing or unreadable file raises ImageError naming it."""
    return [open_rgb(doc["image"])]


def doc_to_text(doc: dict) -> str:
    return QUESTION


def doc_to_choice(doc: dict) -> list[str]:
    return list(doc["choices"])


def doc_to_target(doc: dict) -> int:
    return doc["choices"].index(doc["answer"])


def doc_to_answer(doc: dict) -> str:
    return doc["answer"]


def named_class(text: str, names: list[str]) -> str | None:
    """The class named first in an answer, or None."""
    found = [(text.find(name), name) for name in names if name in text]
    return min(found)[1] if found else None


def process_results(doc: dict, results: list[str]) -> dict[str, float]:
    """Short answer: exact sentence, and whether the class it names is the image's."""
    text = results[0].strip()
    return {
        "exact_match": float(text == doc["answer"]),
        "class_named": float(named_class(text, doc["classes"]) == doc["label"]),
    }


# ----------------------------------------------------------------------------------------------------------------
# writing the folder
# ----------------------------------------------------------------------------------------------------------------

_COMMON = """dataset_path: json
dataset_kwargs:
  data_files:
    test: {docs}
test_split: test
doc_to_visual: !function utils.doc_to_visual
doc_to_text: !function utils.doc_to_text
"""

_MULTIPLE_CHOICE = """task: dualtoken_cifar_mc
output_type: multiple_choice
doc_to_choice: !function utils.doc_to_choice
doc_to_target: !function utils.doc_to_target
target_delimiter: ""
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""

_SHORT_ANSWER = """task: dualtoken_cifar_qa
output_type: generate_until
doc_to_target: !function utils.doc_to_answer
generation_kwargs:
  max_new_tokens: {max_new_tokens}
  temperature: 0
  until: ["\\n"]
process_results: !function utils.process_results
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
  - metric: class_named
    aggregation: mean
    higher_is_better: true
"""

_UTILS = f'''"""The functions of the dualtoken CIFAR-10 tasks (written by {__name__})."""

from {__name__} import doc_to_answer, doc_to_choice, doc_to_target, doc_to_text, doc_to_visual, process_results

__all__ = ["doc_to_answer", "doc_to_choice", "doc_to_target", "doc_to_text", "doc_to_visual", "process_results"]
'''


def write_cifar_task(
    images: str | Path, class_names: list[str], out: str | Path, limit: int | None = None, max_new_tokens: int = 16
) -> Path:
    """The task folder ``out`` for the first ``limit`` images (sorted ids) of ``images``; returns ``out``.
    A folder without ``labels.json``, a label outside ``class_names`` or a listed image that is missing raises
    DataError naming it."""
    images, out = Path(images).resolve(), Path(out)
    labels_path = images / "labels.json"
    if not labels_path.is_file():
        raise DataError(f"{images} has no labels.json (the CIFAR recipe's prepare stage writes one per split)")
    try:
        labels = json.loads(labels_path.read_text())
    except json.JSONDecodeError as exc:
        raise DataError(f"{labels_path}: not JSON ({exc})") from None
    ids = sorted(labels)[:limit]
    if not ids:
        raise DataError(f"{labels_path} lists no images")
    choices = [answer_sentence(name) for name in class_names]
    docs = []
    for image_id in ids:
        path = images / f"{image_id}.png"
        if not path.is_file():
            raise DataError(f"{labels_path} lists {image_id} but {path} is missing")
        label = labels[image_id]
        if not isinstance(label, int) or not 0 <= label < len(class_names):
            raise DataError(f"{labels_path}: {image_id} has label {label!r}, not a class index below {len(class_names)}")
        name = class_names[label]
        docs.append(
            {"id": image_id, "image": str(path), "label": name, "answer": answer_sentence(name),
             "choices": choices, "classes": list(class_names)}
        )
    out.mkdir(parents=True, exist_ok=True)
    docs_path = (out / "docs.jsonl").resolve()
    docs_path.write_text("".join(json.dumps(d) + "\n" for d in docs))
    common = _COMMON.format(docs=json.dumps(str(docs_path)))
    (out / "dualtoken_cifar_mc.yaml").write_text(_MULTIPLE_CHOICE + common)
    (out / "dualtoken_cifar_qa.yaml").write_text(_SHORT_ANSWER.format(max_new_tokens=max_new_tokens) + common)
    (out / "utils.py").write_text(_UTILS)
    return out
