"""MLLM data: conversation and caption readers, the token cache, truncation, condition dropout, clear errors."""

from __future__ import annotations

import io
import json
import tarfile

import pytest
import torch

from dualtoken.errors import DataError
from dualtoken.mllm.data import (
    CaptionRecord,
    ConversationRecord,
    MLLMDataset,
    TokenCache,
    collate,
    read_captions,
    read_conversations,
)
from dualtoken.tokenfile import save_tokens


@pytest.fixture
def cache_dir(tmp_path, tiny_codes):
    """A token cache of two images, ids as `dualtoken encode FOLDER` writes them (paths)."""
    ids = ["../data/coco/images/a.jpg", "../data/coco/images/b.jpg"]
    save_tokens(
        tmp_path / "cache" / "part-0.safetensors",
        tiny_codes.pixel,
        tiny_codes.semantic,
        ids,
        "tiny",
        (256, 256),
    )
    return tmp_path / "cache"


def _write(path, data) -> str:
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return str(path)


LLAVA = [
    {
        "id": "x1",
        "image": "images/a.jpg",
        "conversations": [
            {"from": "human", "value": "<image>\nWhat is it?"},
            {"from": "gpt", "value": "A cat."},
            {"from": "human", "value": "Sure?"},
            {"from": "gpt", "value": "Yes."},
        ],
    },
    {"id": "x2", "conversations": [{"from": "human", "value": "Hello"}, {"from": "gpt", "value": "Hi."}]},
]


def test_read_llava_conversations(tmp_path):
    records = read_conversations(_write(tmp_path / "c.json", LLAVA))
    assert records[0] == ConversationRecord(
        "x1",
        ["images/a.jpg"],
        [("user", "<image>\nWhat is it?"), ("assistant", "A cat."), ("user", "Sure?"), ("assistant", "Yes.")],
    )
    assert records[1].images == []
    jsonl = "\n".join(json.dumps(item) for item in LLAVA)
    assert read_conversations(_write(tmp_path / "c.jsonl", jsonl)) == records


@pytest.mark.parametrize(
    "content, message",
    [
        ("{not json", "not valid JSON"),
        ({"conversations": []}, "expected a JSON list"),
        ([{"image": "a.jpg"}], r"item 0: expected an object"),
        (
            [{"conversations": [{"from": "robot", "value": "hi"}]}],
            r"item 0, turn 0: expected \{'from': one of",
        ),
        ([{"conversations": [{"from": "human", "value": 3}]}], r"turn 0"),
        ([{"conversations": [{"from": "human", "value": "hi"}]}], "no assistant"),
        ([{"image": 5, "conversations": [{"from": "gpt", "value": "x"}]}], "'image' must be a string"),
    ],
)
def test_malformed_conversation_files_are_data_errors(tmp_path, content, message):
    path = _write(tmp_path / "bad.json", content)
    with pytest.raises(DataError, match=message):
        read_conversations(path)


def test_placeholder_count_mismatch_is_a_data_error(tmp_path):
    item = {
        "image": ["a.jpg", "b.jpg"],
        "conversations": [{"from": "human", "value": "<image> what?"}, {"from": "gpt", "value": "A cat."}],
    }
    with pytest.raises(
        DataError, match=r"item 0: 1 <image> placeholder\(s\) in the user turns but 2 image\(s\)"
    ):
        read_conversations(_write(tmp_path / "c.json", [item]))
    no_image = {"conversations": [{"from": "human", "value": "<image> what?"}, {"from": "gpt", "value": "x"}]}
    with pytest.raises(DataError, match="1 <image> placeholder"):
        read_conversations(_write(tmp_path / "d.json", [no_image]))


def test_caption_formats(tmp_path):
    coco = {
        "images": [{"id": 1, "file_name": "a.jpg"}, {"id": 2, "file_name": "b.jpg"}],
        "annotations": [{"image_id": 2, "caption": "a dog"}, {"image_id": 1, "caption": "a cat"}],
    }
    assert read_captions(_write(tmp_path / "coco.json", coco)) == [
        CaptionRecord("b.jpg", "a dog"),
        CaptionRecord("a.jpg", "a cat"),
    ]
    lines = '{"file": "images/a.jpg", "caption": "a cat"}\n{"image": "b.jpg", "text": "a dog"}\n'
    assert read_captions(_write(tmp_path / "c.jsonl", lines)) == [
        CaptionRecord("images/a.jpg", "a cat"),
        CaptionRecord("b.jpg", "a dog"),
    ]
    folder = tmp_path / "folder" / "sub"
    folder.mkdir(parents=True)
    (folder / "x.png").write_bytes(b"")
    (folder / "x.txt").write_text("a ship\n")
    (folder / "y.png").write_bytes(b"")  # no caption: skipped
    assert read_captions(tmp_path / "folder") == [CaptionRecord("sub/x.png", "a ship")]
    shard = tmp_path / "shard-000000.tar"
    with tarfile.open(shard, "w") as tar:
        for name, data in (("k1.txt", b"a frog"), ("k1.png", b"png"), ("k2.json", b'{"caption": "a deer"}')):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    assert read_captions(str(shard)) == [CaptionRecord("k1", "a frog"), CaptionRecord("k2", "a deer")]
    with pytest.raises(DataError, match="expected COCO captions"):
        read_captions(_write(tmp_path / "bad.json", {"images": []}))
    with pytest.raises(DataError, match=r"item 0: expected"):
        read_captions(_write(tmp_path / "bad2.json", [{"file": "a.jpg"}]))


def test_token_cache_lookup_and_compatibility(cache_dir, tiny_codes):
    cache = TokenCache([cache_dir])
    for reference in ("../data/coco/images/a.jpg", "images/a.jpg", "a.jpg", "images/a", "a"):
        assert cache.row(reference) == 0, reference
    assert cache.row("other/a.jpg") is None
    pixel, semantic = cache.codes(["b.jpg", "a.jpg"])
    assert pixel.dtype == torch.long and pixel.equal(tiny_codes.pixel.flip(0))
    assert semantic.equal(tiny_codes.semantic.flip(0))
    with pytest.raises(DataError, match="not in the token cache"):
        cache.codes(["c.jpg"])
    cache.check_compatible((8, 8), (4, 4), (256, 256))
    cache.check_compatible((8, 8), (2, 1), (256, 256))  # a model reading a prefix of the depths
    for grid, depths, sizes in (((16, 16), (4, 4), (256, 256)), ((8, 8), (4, 5), (256, 256)), ((8, 8), (4, 4), (8, 256))):
        with pytest.raises(DataError, match="encode the images with the same tokenizer"):
            cache.check_compatible(grid, depths, sizes)
    with pytest.raises(DataError, match="token cache not found"):
        TokenCache([cache_dir / "missing"])


def test_dataset_mixes_and_checks_images(make_mllm, cache_dir, tmp_path):
    model = make_mllm()
    cache = TokenCache([cache_dir])
    records = read_conversations(_write(tmp_path / "c.json", LLAVA)) + [CaptionRecord("b.jpg", "a dog")] * 50
    dataset = MLLMDataset(records, cache, model.prompt, condition_dropout=0.2, max_length=4096, seed=0)
    batch = collate([dataset.item(0), dataset.item(1), dataset.item(2)], model.pad_id)
    assert batch.generate.tolist() == [False, True] and batch.pixel_codes.shape == (2, 8, 8, 4)
    assert torch.isfinite(model(batch).loss)
    # condition dropout: reproducible per (epoch, index), about the configured rate
    blank = model.prompt.generation(" ").input_ids
    dropped = [dataset.item(i, epoch).sample.input_ids == blank for epoch in range(4) for i in range(2, 52)]
    assert dropped == [
        dataset.item(i, epoch).sample.input_ids == blank for epoch in range(4) for i in range(2, 52)
    ]
    assert 0.1 < sum(dropped) / len(dropped) < 0.3
    with pytest.raises(DataError, match="not in the token cache"):
        MLLMDataset([CaptionRecord("zzz.jpg", "x")], cache, model.prompt, 0.0, 4096, 0)


def test_truncation_never_cuts_an_image(make_mllm):
    model = make_mllm()
    sample = model.prompt.conversation([("user", "<image> and <image> what?"), ("assistant", "Two cats.")], 2)
    (_, end0), (start1, end1) = sample.spans
    assert sample.truncated(len(sample.input_ids)) is sample
    cut = sample.truncated(end1 - 1)
    assert len(cut.input_ids) == start1 and cut.generate == [False] and cut.spans == sample.spans[:1]
    cut = sample.truncated(end1 + 1)
    assert len(cut.input_ids) == end1 + 1 and len(cut.spans) == 2
