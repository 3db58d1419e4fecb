"""Zero-shot classification with the SigLIP text tower, and top-k accuracy from any class scores.

The classifier is built as in the reference evaluation (open_clip ``zero_shot_eval``, docs/METHOD.md "Evaluation protocol"): for each class,
the text embeddings of the 80 templates are L2-normalised, averaged and renormalised. Building it runs the text
tower over C x 80 prompts, so it is cached on disk under a key of everything it depends on.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import string
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from ..errors import CheckpointError, DataError

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "spiece.model", "tokenizer.model", "vocab.json")
WEIGHT_SUFFIXES = (".safetensors", ".bin")


def read_class_names(path: str | Path) -> list[str]:
    """Class names in index order: a TSV with a header holding ``name`` (and optionally ``index``), as
    ``imagenet_samples/classes.tsv``; or a text file with one name per line, as ``cifar10/classes.txt``."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"class-name file not found: {path}")
    lines = path.read_text(encoding="utf-8").splitlines()
    if path.suffix == ".tsv":
        rows = list(csv.DictReader(lines, delimiter="\t"))
        if not rows or "name" not in rows[0]:
            raise DataError(f"{path}: expected a TSV with a header holding a 'name' column (index, wnid, name)")
        if "index" in rows[0]:
            rows.sort(key=lambda row: int(row["index"]))
            if [int(row["index"]) for row in rows] != list(range(len(rows))):
                raise DataError(f"{path}: the 'index' column must run 0..{len(rows) - 1}")
        return [row["name"] for row in rows]
    names = [line.strip() for line in lines if line.strip()]
    if not names:
        raise DataError(f"{path}: no class names (expected one name per line)")
    return names


def canonicalize(text: str) -> str:
    """open_clip's ``canonicalize`` cleaning: no punctuation, lower case, single spaces."""
    text = text.translate(str.maketrans("", "", string.punctuation)).lower()
    return " ".join(text.split())


def has_tokenizer(folder: str | Path) -> bool:
    return any((Path(folder) / name).is_file() for name in TOKENIZER_FILES)


def _cache_key(folder: Path, class_names: list[str], templates: tuple[str, ...], context_length: int, clean: str) -> str:
    files = []
    for path in sorted(folder.iterdir()):
        if path.name in TOKENIZER_FILES or path.name == "config.json" or path.suffix in WEIGHT_SUFFIXES:
            stat = path.stat()
            files.append([path.name, stat.st_size, stat.st_mtime_ns])
    payload = {
        "folder": str(folder.resolve()),
        "files": files,
        "classes": class_names,
        "templates": list(templates),
        "context_length": context_length,
        "clean": clean,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:24]


@torch.no_grad()
def build_text_classifier(
    folder: str | Path,
    class_names: list[str],
    templates: tuple[str, ...],
    context_length: int,
    batch_size: int,
    clean: str,
) -> torch.Tensor:
    """The zero-shot classifier (C, E) from the SigLIP text tower and tokenizer of ``folder``; rows unit-norm."""
    from transformers import AutoTokenizer, SiglipTextModel

    folder = Path(folder)
    if not has_tokenizer(folder):
        raise CheckpointError(f"{folder} holds no tokenizer files (expected one of {list(TOKENIZER_FILES)})")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = SiglipTextModel.from_pretrained(folder, torch_dtype=torch.float32).eval()
    context_length = min(context_length, model.config.max_position_embeddings)
    rows = []
    for name in tqdm(class_names, desc="zero-shot classifier", unit="class", leave=False):
        prompts = [template.format(name) for template in templates]
        if clean == "canonicalize":
            prompts = [canonicalize(prompt) for prompt in prompts]
        embeddings = []
        for start in range(0, len(prompts), batch_size):
            batch = tokenizer(
                prompts[start : start + batch_size], padding="max_length", max_length=context_length,
                truncation=True, return_tensors="pt",
            )
            embeddings.append(model(input_ids=batch["input_ids"]).pooler_output.float())  # (b, E)
        per_template = torch.nn.functional.normalize(torch.cat(embeddings), dim=-1)  # (T, E)
        rows.append(torch.nn.functional.normalize(per_template.mean(dim=0), dim=-1))
    return torch.stack(rows)  # (C, E)


def cached_text_classifier(
    folder: str | Path,
    class_names: list[str],
    templates: tuple[str, ...],
    context_length: int,
    batch_size: int,
    clean: str,
    cache_dir: str | Path,
) -> tuple[torch.Tensor, Path]:
    """:func:`build_text_classifier`, read from ``cache_dir`` when built before; returns (classifier, cache file)."""
    folder = Path(folder)
    cache_dir = Path(cache_dir)
    path = cache_dir / f"classifier-{_cache_key(folder, class_names, templates, context_length, clean)}.safetensors"
    if path.is_file():
        return load_file(str(path))["classifier"], path
    classifier = build_text_classifier(folder, class_names, templates, context_length, batch_size, clean)
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    save_file({"classifier": classifier.contiguous()}, str(tmp), metadata={"folder": str(folder)})
    os.replace(tmp, path)
    return classifier, path


def topk_hits(scores: torch.Tensor, labels: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per image, whether the label is the best class and whether it is among the best ``k``: two (B,) floats.

    scores (B, C) (logits or similarities); labels (B,) class indices.
    """
    k = min(k, scores.shape[1])
    best = scores.topk(k, dim=1).indices  # (B, k)
    hits = best == labels.unsqueeze(1)
    return hits[:, 0].float(), hits.any(dim=1).float()
