"""The shipped model's headline figures have one source, its model card (the Figures table of
``src/dualtoken/pretrained/dualtoken-efflite0/README.md``, written by ``recipes/efflite0/ship.py`` from
``recipes/efflite0/model_card/dualtoken-efflite0.json``); README.md and docs/RESULTS.md quote it exactly."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
MODEL = REPO / "src" / "dualtoken" / "pretrained" / "dualtoken-efflite0"
RECORDED = REPO / "recipes" / "efflite0" / "model_card" / "dualtoken-efflite0.json"


def _figures_section(card: str) -> str:
    return card.split("\n## Figures\n", 1)[1].split("\n## ", 1)[0]


def _card() -> dict[str, str]:
    """The card's Figures table: {metric: value as printed}."""
    rows = [line[2:-2].split(" | ") for line in _figures_section((MODEL / "README.md").read_text()).splitlines()
            if line.startswith("| ") and not line.startswith("| ---")]
    return dict(rows[1:])  # below the header


def _text(path: Path) -> str:
    return " ".join(path.read_text().split())  # line breaks as spaces


@pytest.fixture(scope="module")
def figures() -> dict[str, str]:
    card = _card()
    top1 = "held-out ImageNet top-1 from the semantic codes (500 odd-class imagenet_samples)"
    tower = "the unquantized tower on the same images, top-1 / top-5"
    return {
        "psnr": card["Kodak-24 PSNR, 256 px (dB)"],
        "top1": f"{float(card[top1]) * 100:.1f} %",
        "tower": f"{float(card[tower].split(' / ')[0]) * 100:.1f} %",
        "cosine": card["token cosine of the quantized semantic features to the tower's block 11"],
        "pixel": card["training, pixel path (2-core CPU minutes: cpu.json, per-depth codebooks, continued)"],
        "semantic": card["training, semantic vocabulary (2-core CPU minutes, three stages on cached features)"],
        "size": card["model.safetensors, float16 (MB)"],
    }


def test_the_card_shows_the_recorded_figures_and_the_real_size(figures):
    from dualtoken import DualTokenizer
    from dualtoken.checkpoint import model_card

    written = model_card(DualTokenizer.from_pretrained("dualtoken-efflite0"), json.loads(RECORDED.read_text()))
    assert _figures_section(written) == _figures_section((MODEL / "README.md").read_text())
    assert f"{(MODEL / 'model.safetensors').stat().st_size / 2**20:.1f}" == figures["size"]  # as ship.py prints it


def test_the_readme_quotes_the_card(figures):
    text = _text(REPO / "README.md")
    for quote in (
        f"{figures['pixel']} minutes for the pixel path, {figures['semantic']} for the semantic vocabulary",
        f"{figures['size']} MB inside the package",
        f"Kodak PSNR {figures['psnr']} dB",
        f"top-1 from the semantic codes {figures['top1']} against the tower's own {figures['tower']}",
    ):
        assert quote in text, quote
    assert set(re.findall(r"Kodak PSNR (\S+) dB", text)) == {figures["psnr"]}  # no other, older figure


def test_results_quotes_the_card(figures):
    text = _text(REPO / "docs" / "RESULTS.md")
    for quote in (
        f"reaches **{figures['psnr']} dB** (its pixel path: {figures['pixel']} CPU minutes",
        f"**{figures['top1']}** held-out top-1 against the teacher's **{figures['tower']}**",
        f"a token cosine of **{figures['cosine']}**",
        f"in three stages, {figures['semantic']} CPU minutes",
        f"(float16: {figures['size']} MB)",
    ):
        assert quote in text, quote
