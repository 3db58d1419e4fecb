"""The page's depth controls, run in node against a stand-in DOM (tests/serving/page_harness.js) on a real
/v1/reconstruct answer: each vocabulary has its own slider, both start at all their depths, and the meaning panel
reads the semantic depths the semantic slider names. (test_browser.py drives the real page in Chromium.)"""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
from importlib import resources
from pathlib import Path

import pytest
import torch

from dualtoken import DualTokenizer, get_config
from dualtoken.serving import ServeConfig, create_app

from .conftest import encode_image

HARNESS = Path(__file__).with_name("page_harness.js")
APP_JS = Path(str(resources.files("dualtoken.serving") / "static" / "app.js"))


@pytest.fixture
def answer():
    """GET /v1/models and POST /v1/reconstruct of a tiny model with 4 pixel and 6 semantic depths, with a made-up
    reading per semantic prefix (the tiny model has no classifier)."""
    from fastapi.testclient import TestClient

    config = get_config("dualtoken-tiny")
    config = dataclasses.replace(config, semantic_quantizer=dataclasses.replace(config.semantic_quantizer, depth=6))
    torch.manual_seed(0)
    tokenizer = DualTokenizer.from_config(config).eval()
    pixels = (torch.rand(64, 64, 3) * 255).to(torch.uint8).numpy()
    with TestClient(create_app(tokenizer, config=ServeConfig())) as client:
        models = client.get("/v1/models").json()
        result = client.post("/v1/reconstruct", files={"image": ("a.png", encode_image(pixels))}).json()
    models["models"][0]["meaning"] = {"classifier": "test classifier", "reference": "unquantized"}
    result["meaning"] = {
        "codes": [[{"name": f"class seen from {k} depths", "probability": 0.5}] for k in range(1, 7)],
        "unquantized": [{"name": "class seen from 6 depths", "probability": 0.6}],
    }
    return {"models": models, "result": result}


@pytest.mark.skipif(shutil.which("node") is None, reason="node is not installed")
def test_each_vocabulary_has_its_own_depth_and_the_meaning_reads_all_semantic_depths(answer):
    run = subprocess.run(["node", str(HARNESS), str(APP_JS)], input=json.dumps(answer), capture_output=True,
                         text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    shown = json.loads(run.stdout)
    result = answer["result"]
    start, semantic_one, pixel_one = shown["start"], shown["semanticOne"], shown["pixelOne"]
    assert start["pixelSlider"] == ["4", "4"] and start["semanticSlider"] == ["6", "6"]
    assert start["meaning"] == ["class seen from 6 depths"]  # all semantic depths by default
    assert start["semanticMap"] == result["semantic"]["token_maps"][5] and start["semanticLabel"] == "k = 6 of 6"
    # the semantic slider moves the meaning and the semantic map, not the reconstruction
    assert semantic_one["meaning"] == ["class seen from 1 depths"]
    assert semantic_one["semanticMap"] == result["semantic"]["token_maps"][0]
    assert semantic_one["recon"] == start["recon"] == result["steps"][3]["image"]
    # the pixel slider moves the reconstruction and the pixel map, not the semantic reading
    assert pixel_one["recon"] == result["steps"][0]["image"] and pixel_one["pixelMap"] == result["pixel"]["token_maps"][0]
    assert pixel_one["meaning"] == semantic_one["meaning"] and pixel_one["semanticMap"] == semantic_one["semanticMap"]
