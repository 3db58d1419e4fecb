"""MLLM training data: understanding conversations and generation captions, with images from a token cache.

Images are never decoded here: every image reference is looked up in token files written by ``dualtoken encode``
(:mod:`dualtoken.tokenfile`), by its id (exactly, or without its file extension).

Readers (each raises DataError naming the file, the item and the expected form):
- conversations: LLaVA JSON (a list of ``{"id", "image": str | [str], "conversations": [{"from", "value"}]}``,
  roles human/user and gpt/assistant, one ``<image>`` placeholder per image), or JSONL of the same objects;
- captions: COCO JSON (``images`` + ``annotations``), a JSON list or JSONL of ``{"file"|"image", "caption"|"text"}``,
  a folder of images with ``.txt`` sidecars, or WebDataset shards (``__key__`` + ``txt`` or ``json["caption"]``).
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import torch

from ..errors import DataError
from ..tokenfile import load_tokens
from .model import MLLMBatch
from .prompt import IGNORE, PromptBuilder, RenderedSample

ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}


@dataclass
class ConversationRecord:
    """An understanding sample: turns (role "user" / "assistant", text) about ``images`` (cache ids)."""

    id: str
    images: list[str]
    turns: list[tuple[str, str]]


@dataclass
class CaptionRecord:
    """A generation sample: ``caption`` -> the image ``image`` (a cache id)."""

    image: str
    caption: str


# ----------------------------------------------------------------------------------------------------------------
# readers
# ----------------------------------------------------------------------------------------------------------------


def _read_json_or_jsonl(path: Path) -> list:
    if not path.is_file():
        raise DataError(f"data file not found: {path}")
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix == ".jsonl":
            return [json.loads(line) for line in text.splitlines() if line.strip()]
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(
            f"{path} is not valid {'JSONL' if path.suffix == '.jsonl' else 'JSON'}: {exc}"
        ) from None


def _conversation(item, where: str, placeholder: str) -> ConversationRecord:
    form = '{"image": str or [str], "conversations": [{"from": "human"|"gpt", "value": str}, ...]}'
    if (
        not isinstance(item, dict)
        or not isinstance(item.get("conversations"), list)
        or not item["conversations"]
    ):
        raise DataError(f"{where}: expected an object {form}")
    images = item.get("image", [])
    images = [images] if isinstance(images, str) else images
    if not isinstance(images, list) or not all(isinstance(i, str) for i in images):
        raise DataError(f"{where}: 'image' must be a string or a list of strings, got {item.get('image')!r}")
    turns = []
    for n, turn in enumerate(item["conversations"]):
        if (
            not isinstance(turn, dict)
            or not isinstance(turn.get("value"), str)
            or turn.get("from") not in ROLES
        ):
            raise DataError(
                f"{where}, turn {n}: expected {{'from': one of {sorted(ROLES)}, 'value': str}}, got {turn!r}"[
                    :300
                ]
            )
        turns.append((ROLES[turn["from"]], turn["value"]))
    if not any(role == "assistant" for role, _ in turns):
        raise DataError(f"{where}: no assistant (gpt) turn to learn from")
    found = sum(text.count(placeholder) for role, text in turns if role == "user")
    if found != len(images):
        raise DataError(
            f"{where}: {found} {placeholder} placeholder(s) in the user turns but {len(images)} image(s) listed; "
            "put one placeholder per image"
        )
    return ConversationRecord(str(item.get("id", where)), images, turns)


def read_conversations(path: str | Path, placeholder: str = "<image>") -> list[ConversationRecord]:
    """LLaVA-style conversations from a JSON list or a JSONL file."""
    path = Path(path)
    items = _read_json_or_jsonl(path)
    if not isinstance(items, list):
        raise DataError(f"{path}: expected a JSON list of conversations, got {type(items).__name__}")
    return [_conversation(item, f"{path}: item {i}", placeholder) for i, item in enumerate(items)]


def _caption_object(item, where: str) -> CaptionRecord:
    image = item.get("file", item.get("image")) if isinstance(item, dict) else None
    caption = item.get("caption", item.get("text")) if isinstance(item, dict) else None
    if not isinstance(image, str) or not isinstance(caption, str):
        raise DataError(
            f'{where}: expected {{"file" or "image": str, "caption" or "text": str}}, got {item!r}'[:300]
        )
    return CaptionRecord(image, caption)


def _coco_captions(data: dict, path: Path) -> list[CaptionRecord]:
    try:
        files = {image["id"]: image["file_name"] for image in data["images"]}
        return [CaptionRecord(files[a["image_id"]], a["caption"]) for a in data["annotations"]]
    except (KeyError, TypeError) as exc:
        raise DataError(
            f"{path}: expected COCO captions {{'images': [{{'id', 'file_name'}}], "
            f"'annotations': [{{'image_id', 'caption'}}]}} ({type(exc).__name__}: {exc})"
        ) from None


def _folder_captions(folder: Path) -> list[CaptionRecord]:
    records = []
    for image in sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES):
        sidecar = image.with_suffix(".txt")
        if sidecar.is_file():
            records.append(CaptionRecord(image.relative_to(folder).as_posix(), sidecar.read_text().strip()))
    if not records:
        raise DataError(f"{folder}: no image with a .txt caption beside it")
    return records


def _webdataset_captions(source: str) -> list[CaptionRecord]:
    import webdataset as wds

    records = []
    try:
        for sample in wds.WebDataset(source, shardshuffle=False, empty_check=False):
            if "txt" in sample:
                caption = sample["txt"].decode("utf-8")
            elif "json" in sample:
                caption = json.loads(sample["json"])["caption"]
            else:
                raise DataError(f"{source}: sample {sample['__key__']} has no txt or json caption")
            records.append(CaptionRecord(sample["__key__"], caption.strip()))
    except (OSError, ValueError, KeyError) as exc:
        raise DataError(f"{source}: unreadable WebDataset shards ({type(exc).__name__}: {exc})") from None
    return records


def read_captions(source: str | Path) -> list[CaptionRecord]:
    """Image-caption pairs from any of the caption formats (see the module docstring)."""
    text = str(source)
    if text.endswith((".tar", ".tar.gz", ".tgz")) or "{" in text:
        return _webdataset_captions(text)
    path = Path(source)
    if path.is_dir():
        return _folder_captions(path)
    data = _read_json_or_jsonl(path)
    if isinstance(data, dict):
        return _coco_captions(data, path)
    if not isinstance(data, list):
        raise DataError(f"{path}: expected COCO captions, or a list of {{file, caption}} objects")
    return [_caption_object(item, f"{path}: item {i}") for i, item in enumerate(data)]


# ----------------------------------------------------------------------------------------------------------------
# token cache
# ----------------------------------------------------------------------------------------------------------------


def _lookup_keys(image_id: str) -> list[str]:
    """Every trailing part of a path-like id, with and without its extension: "a/b/c.jpg" -> "a/b/c.jpg",
    "a/b/c", "b/c.jpg", "b/c", "c.jpg", "c"."""
    parts = PurePosixPath(image_id.replace("\\", "/")).parts
    keys = []
    for start in range(len(parts)):
        tail = PurePosixPath(*parts[start:])
        keys += [str(tail), str(tail.with_suffix("")) if tail.suffix else str(tail)]
    return keys


class TokenCache:
    """Both code maps of every image in a set of token files, looked up by image id: exactly, or by a unique
    trailing part of the id's path with or without the extension (so "images/x.jpg" finds the id
    "../data/coco/images/x.jpg" that `dualtoken encode FOLDER` wrote)."""

    def __init__(self, sources: Iterable[str | Path]) -> None:
        pixel, semantic, self.ids = [], [], []
        files = []
        for source in sources:
            source = Path(source)
            if source.is_dir():
                files += sorted(source.glob("*.safetensors"))
            elif source.is_file():
                files.append(source)
            else:
                raise DataError(f"token cache not found: {source}")
        if not files:
            raise DataError("the token cache is empty: no token files (*.safetensors) found")
        for path in files:
            tokens = load_tokens(path)
            if pixel and (
                tokens.pixel.shape[1:] != pixel[0].shape[1:]
                or tokens.semantic.shape[1:] != semantic[0].shape[1:]
            ):
                raise DataError(
                    f"{path}: code maps of shape {tuple(tokens.pixel.shape[1:])} unlike the other files"
                )
            self.ids += tokens.ids
            pixel.append(tokens.pixel.to(torch.int32))
            semantic.append(tokens.semantic.to(torch.int32))
        self.exact = {image_id: row for row, image_id in enumerate(self.ids)}
        aliases: dict[str, int] = {}
        for row, image_id in enumerate(self.ids):
            for key in set(_lookup_keys(image_id)):
                aliases[key] = -1 if aliases.get(key, row) != row else row  # -1: ambiguous
        self.aliases = {key: row for key, row in aliases.items() if row >= 0}
        self.pixel = torch.cat(pixel)  # (N, h, w, Qp)
        self.semantic = torch.cat(semantic)  # (N, h, w, Qs)

    def __len__(self) -> int:
        return self.pixel.shape[0]

    def row(self, image_id: str) -> int | None:
        """The row of ``image_id``, or None when it is absent or ambiguous."""
        if image_id in self.exact:
            return self.exact[image_id]
        for key in _lookup_keys(image_id)[:2]:  # the reference itself, with and without its extension
            if key in self.aliases:
                return self.aliases[key]
        return None

    def codes(self, image_ids: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Pixel and semantic codes (M, h, w, Q) int64 of ``image_ids``."""
        rows = []
        for image_id in image_ids:
            row = self.row(image_id)
            if row is None:
                raise DataError(
                    f"image {image_id!r} is not in the token cache (cache ids look like {self.ids[0]!r})"
                )
            rows.append(row)
        rows = torch.tensor(rows, dtype=torch.long)
        return self.pixel[rows].long(), self.semantic[rows].long()

    def check_compatible(
        self, grid: tuple[int, int], depths: tuple[int, int], sizes: tuple[int, int]
    ) -> None:
        """Raise DataError unless the cached codes fit the MLLM's DualToken tokenizer: its grid, codebook sizes and
        at least the ``depths`` (pixel, semantic) that the MLLM reads (a cache of all depths serves any prefix)."""
        found = tuple(self.pixel.shape[1:]), tuple(self.semantic.shape[1:])
        top = int(self.pixel.max()), int(self.semantic.max())
        fits = all(
            shape[:2] == grid and shape[2] >= depth for shape, depth in zip(found, depths, strict=True)
        )
        if not fits or top[0] >= sizes[0] or top[1] >= sizes[1]:
            raise DataError(
                f"the token cache holds codes {found} up to {top}, but the MLLM reads {(*grid, depths[0])} pixel and "
                f"{(*grid, depths[1])} semantic codes with codebooks of {sizes}: encode the images with the same "
                "tokenizer"
            )


# ----------------------------------------------------------------------------------------------------------------
# the mixed data set
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class RenderedItem:
    sample: RenderedSample
    pixel: torch.Tensor  # (M, h, w, Qp), all the cached depths (the model reads its prefix)
    semantic: torch.Tensor  # (M, h, w, Qs)


class MLLMDataset:
    """Conversations and captions in one list; item ``i`` of epoch ``e`` is rendered on the fly (the condition
    dropout of a caption is drawn from (seed, epoch, i), so a resumed run sees the same data)."""

    def __init__(
        self,
        records: list[ConversationRecord | CaptionRecord],
        cache: TokenCache,
        builder: PromptBuilder,
        condition_dropout: float,
        max_length: int,
        seed: int,
    ) -> None:
        if not records:
            raise DataError("no training data: give data.conversations and/or data.captions")
        self.records, self.cache, self.builder = records, cache, builder
        self.condition_dropout, self.max_length, self.seed = condition_dropout, max_length, seed
        missing = [
            i
            for r in records
            for i in (r.images if isinstance(r, ConversationRecord) else [r.image])
            if cache.row(i) is None
        ]
        if missing:
            raise DataError(
                f"{len(missing)} image(s) of the data are not in the token cache, e.g. {missing[:3]}; "
                f"cache ids look like {cache.ids[:2]}"
            )

    def __len__(self) -> int:
        return len(self.records)

    def item(self, index: int, epoch: int = 0) -> RenderedItem:
        record = self.records[index]
        if isinstance(record, ConversationRecord):
            sample = self.builder.conversation(record.turns, len(record.images), where=record.id)
            images = record.images
        else:
            caption = record.caption
            if random.Random(f"{self.seed}:{epoch}:{index}").random() < self.condition_dropout:
                caption = self.builder.config.blank_prompt
            sample = self.builder.generation(caption)
            images = [record.image]
        sample = sample.truncated(self.max_length)
        pixel, semantic = self.cache.codes(images[: len(sample.generate)])
        return RenderedItem(sample, pixel, semantic)


def collate(items: list[RenderedItem], pad_id: int) -> MLLMBatch:
    """Right-pad to the longest sample; images in slot order."""
    length = max(len(item.sample.input_ids) for item in items)
    ids = torch.full((len(items), length), pad_id, dtype=torch.long)
    labels = torch.full((len(items), length), IGNORE, dtype=torch.long)
    mask = torch.zeros(len(items), length, dtype=torch.long)
    for row, item in enumerate(items):
        n = len(item.sample.input_ids)
        ids[row, :n] = torch.tensor(item.sample.input_ids)
        labels[row, :n] = torch.tensor(item.sample.labels)
        mask[row, :n] = 1
    return MLLMBatch(
        input_ids=ids,
        attention_mask=mask,
        labels=labels,
        pixel_codes=torch.cat([item.pixel for item in items]),
        semantic_codes=torch.cat([item.semantic for item in items]),
        generate=torch.tensor([g for item in items for g in item.sample.generate], dtype=torch.bool),
    )
