"""encode_dataset: sharded token files equal to tokenizer.encode, corrupt images skipped, resumable."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch

from dualtoken.data import SkippedImageWarning, encode_dataset, open_image_source
from dualtoken.tokenfile import iter_token_files, load_tokens


def _encode(*args, **kwargs) -> dict:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SkippedImageWarning)
        return encode_dataset(*args, progress=False, **kwargs)


def _contents(folder: Path) -> dict[str, tuple]:
    files = {p.name: load_tokens(p) for p in sorted(folder.glob("*.safetensors"))}
    return {name: (f.ids, f.pixel.tolist(), f.semantic.tolist()) for name, f in files.items()}


@pytest.mark.parametrize("workers", [0, 2])
def test_folder_tokens_match_encode_and_skip_corrupt(
    tiny_tokenizer, image_folder: Path, tmp_path: Path, workers
):
    out = tmp_path / "tokens"
    summary = _encode(
        tiny_tokenizer, str(image_folder), str(out), shard_size=5, batch_size=3, num_workers=workers
    )
    assert summary["images"] == 12 and summary["skipped"] == 1 and summary["units"] == 3
    files = list(iter_token_files(out))
    assert [len(f.ids) for f in files] == [5, 4, 3]  # 13 listed; b/broken.png (7th) is in unit 1
    ids = [i for f in files for i in f.ids]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SkippedImageWarning)
        images, expected_ids = zip(*open_image_source(image_folder, tiny_tokenizer.image_size))
    assert ids == list(expected_ids)
    expected = tiny_tokenizer.encode(torch.stack(images))
    assert torch.equal(torch.cat([f.pixel for f in files]), expected.pixel)
    assert torch.equal(torch.cat([f.semantic for f in files]), expected.semantic)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["images"] == 12 and manifest["skipped"] == 1 and not manifest["missing_units"]


def test_resume_skips_done_units_and_redoes_unfinished(tiny_tokenizer, shard_folder: Path, tmp_path: Path):
    out = tmp_path / "tokens"
    first = _encode(tiny_tokenizer, str(shard_folder), str(out), shard_size=4, batch_size=4)
    assert (
        first["units"] == 3 and first["images"] == 29 and len(first["files"]) == 9
    )  # 4 + 4 + 2, 4 + 4 + 1, 4 + 4 + 2
    before = _contents(out)
    (out / "tokens-000001.done").unlink()  # as if interrupted while unit 1 was being written
    (out / "tokens-000001-0002.safetensors").unlink()
    second = _encode(tiny_tokenizer, str(shard_folder), str(out), shard_size=4, batch_size=4)
    assert second["units_reused"] == 2 and second["units_encoded"] == 1 and second["images"] == 9
    assert _contents(out) == before


ENCODE_WORKER = """
import sys, torch
from dualtoken import DualTokenizer
from dualtoken.data import encode_dataset
torch.set_num_threads(1)
torch.manual_seed(0)
tokenizer = DualTokenizer.from_config("dualtoken-tiny").eval()
encode_dataset(tokenizer, sys.argv[1], sys.argv[2], shard_size=3, batch_size=2, progress=False)
"""


@pytest.mark.slow
@pytest.mark.distributed
def test_two_processes_write_the_same_tokens_as_one(image_folder: Path, tmp_path: Path):
    import os
    import subprocess
    import sys

    script = tmp_path / "worker.py"
    script.write_text(ENCODE_WORKER)
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        str(script),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    result = subprocess.run(
        [*command, str(image_folder), str(tmp_path / "two")],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    torch.manual_seed(0)
    from dualtoken import DualTokenizer

    _encode(
        DualTokenizer.from_config("dualtoken-tiny").eval(),
        str(image_folder),
        str(tmp_path / "one"),
        shard_size=3,
        batch_size=2,
    )
    assert _contents(tmp_path / "two") == _contents(tmp_path / "one")
    manifest = json.loads((tmp_path / "two" / "manifest.json").read_text())
    assert manifest["images"] == 12 and manifest["skipped"] == 1 and not manifest["missing_units"]
