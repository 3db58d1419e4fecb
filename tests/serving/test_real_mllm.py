"""``--mllm DIR``: a real (tiny, random) DualTokenMLLM saved with save_pretrained, loaded and served."""

from __future__ import annotations

from io import BytesIO

import pytest
import torch
from PIL import Image

from dualtoken.serving import MultimodalModel, create_app
from dualtoken.serving.mllm import load_mllm

mllm = pytest.importorskip("dualtoken.mllm", reason="the MLLM package is not available")
pytestmark = pytest.mark.slow


@pytest.fixture
def mllm_dir(tiny_tokenizer, tmp_path):
    from dualtoken.mllm.text_tokenizer import train_bpe_tokenizer

    corpus = [f"What is in this image? It is a {name}. Draw a {name}." for name in ("cat", "dog", "ship")] * 10
    train_bpe_tokenizer(corpus, 300, tmp_path / "bpe")
    llm = {
        "model_type": "llama",
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": 300,
        "max_position_embeddings": 512,
    }
    config = mllm.MLLMConfig(
        tokenizer="tokenizer",
        llm=mllm.LLMConfig(architecture=llm, text_tokenizer=str(tmp_path / "bpe")),
        heads=mllm.DepthHeadConfig(layers=1, width=32, num_heads=4, dropout=0.0),
        sampling=mllm.SamplingConfig(top_k=50, top_p=0.95, max_new_tokens=6),
    )
    torch.manual_seed(0)
    model = mllm.DualTokenMLLM.from_config(config, visual_tokenizer=tiny_tokenizer)
    return model.save_pretrained(tmp_path / "mllm")


def test_a_saved_mllm_is_served(mllm_dir, tiny_tokenizer, photo_bytes):
    from fastapi.testclient import TestClient

    model = load_mllm(mllm_dir)
    assert isinstance(model, MultimodalModel)
    with TestClient(create_app(tiny_tokenizer, mllm=model)) as client:
        files = {"image": ("photo.png", photo_bytes, "image/png")}
        answer = client.post("/v1/chat", files=files, data={"question": "What is in this image?"})
        assert answer.status_code == 200 and isinstance(answer.json()["answer"], str)
        body = {"prompt": "Draw a cat.", "cfg_scale": 3.0, "seed": 1}
        first, again = (client.post("/v1/generate", json=body) for _ in range(2))
        assert first.status_code == 200 and first.content == again.content  # deterministic for a seed
        assert Image.open(BytesIO(first.content)).size == (64, 64)
