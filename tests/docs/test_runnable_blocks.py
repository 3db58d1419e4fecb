"""Every Python block of README.md and docs/*.md marked runnable runs as written.

The marker: a line ``<!-- runnable -->`` (invisible once rendered) directly above a fenced ```` ```python ````
block. Each marked block runs in its own Python process, with this checkout's ``src`` first on the path, in a
fresh temporary folder that holds ``photo.jpg`` (a real photo: scikit-image's ``coffee``), so a block may read
``photo.jpg`` and write relative paths. Blocks without the marker (they need a GPU, a download or data that is not
in the repository) are not run.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
MARKER = "<!-- runnable -->"
BLOCK = re.compile(re.escape(MARKER) + r"\n```python\n(.*?)\n```", re.DOTALL)


def runnable_blocks() -> list[tuple[str, str]]:
    """(id "file:line", code) of every marked block."""
    blocks = []
    for doc in DOCS:
        text = doc.read_text()
        assert text.count(MARKER) == len(BLOCK.findall(text)), f"{doc.name}: a {MARKER} line not above a python block"
        for match in BLOCK.finditer(text):
            blocks.append((f"{doc.name}:{text[: match.start()].count(chr(10)) + 1}", match.group(1)))
    return blocks


BLOCKS = runnable_blocks()


def test_the_readme_has_runnable_blocks():
    assert any(name.startswith("README.md") for name, _ in BLOCKS)


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    from PIL import Image
    from skimage import data

    Image.fromarray(data.coffee()).save(tmp_path / "photo.jpg")
    return tmp_path


@pytest.mark.parametrize(("where", "code"), BLOCKS, ids=[name for name, _ in BLOCKS])
def test_marked_block_runs(where: str, code: str, workdir: Path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-c", code], cwd=workdir, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, f"{where} failed:\n{result.stderr[-3000:]}"


def test_the_readme_api_block_runs_on_shipped_photos_and_prints_shapes_and_psnr(tmp_path: Path):
    """The README's first block needs no file of the reader's (an empty folder) and shows what it computed."""
    where, code = next((name, code) for name, code in BLOCKS if name.startswith("README.md"))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, f"{where} failed:\n{result.stderr[-3000:]}"
    assert "images (2, 3, 256, 256) pixel codes (2, 16, 16, " in result.stdout
    psnrs = [float(v) for v in re.findall(r"'(\d+\.\d) dB'", result.stdout)]
    assert len(psnrs) == 2 and all(15 < v < 40 for v in psnrs), result.stdout
