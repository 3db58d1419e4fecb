"""`dualtoken eval` under torchrun (2 processes, gloo) gives the report of a single process."""

import json
import os
import socket
import subprocess
import sys

import pytest

from dualtoken.evaluation import EvalConfig, evaluate


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _close(a, b, path=""):
    """Equal, except floats within 1e-4 relative: features are float32 convolutions of other batch splits and
    thread counts (one-ulp differences, which KID's subset statistics amplify), and their sums are added in another
    order. A rank's images lost or counted twice moves these figures by percents."""
    if isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for key in a:
            _close(a[key], b[key], f"{path}.{key}")
    elif isinstance(a, list):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _close(x, y, f"{path}[{i}]")
    elif isinstance(a, float):
        assert a == pytest.approx(b, rel=1e-4, abs=1e-7), path
    else:
        assert a == b, path


@pytest.mark.distributed
@pytest.mark.slow
def test_two_process_gloo_evaluation_equals_one_process(tiny_tokenizer, image_folder, tmp_path):
    model = tiny_tokenizer.save_pretrained(tmp_path / "model")
    settings = {"batch_size": 2, "kid_subsets": 5, "kid_subset_size": 3, "grid_images": 2, "feature_resize": 64}
    config = EvalConfig(**settings)
    (tmp_path / "eval.json").write_text(json.dumps(settings))
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
        "--master_port", str(_free_port()), "-m", "dualtoken", "eval", "--model", str(model), "--data",
        str(image_folder), "--out", str(tmp_path / "two"), "--config", str(tmp_path / "eval.json"), "--no-progress",
        "--device", "cpu",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    two = json.loads((tmp_path / "two" / "report.json").read_text())
    one = json.loads(json.dumps(evaluate(str(model), image_folder, tmp_path / "one", config, device="cpu",
                                         progress=False)))
    assert two["runtime"]["world_size"] == 2 and one["runtime"]["world_size"] == 1
    for key in ("metrics", "rate_distortion", "codebooks", "stability", "extremes", "data", "skipped_metrics"):
        _close(two[key], one[key], key)
    assert (tmp_path / "two" / "reconstruction_grid.png").is_file()
