"""The compiled depth loop of the Gram-matrix search (dualtoken.search_kernel) against the exact search."""

import threading

import pytest
import torch

from dualtoken import search_kernel
from dualtoken.config import QuantizerConfig
from dualtoken.quantizer import ResidualQuantizer, _search_kernel, nearest_codes, residual_codes

from .conftest import per_depth_codes

pytestmark = pytest.mark.skipif(not search_kernel.available(), reason="numba is not installed")


def crowded_case(K=512, D=80, seed=0):
    """Exact duplicates, copies one float32 step apart, a code repeated 70 times with 1e-7 noise, and rows halfway
    between two codes: the near-tie settling runs on many rows and depths, with ties to break by the lowest code."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(K // 4, D, generator=g)
    nudged = base.clone()
    nudged[:, 0] = torch.nextafter(nudged[:, 0], torch.full_like(nudged[:, 0], 100.0))
    crowd = base[:1].repeat(70, 1) + 1e-7 * torch.randn(70, D, generator=g)
    rest = torch.randn(K - 2 * (K // 4) - 70 - K // 8, D, generator=g)
    codebook = torch.cat([base, base[: K // 8], nudged, crowd, rest])
    codebook = codebook[torch.randperm(K, generator=g)].contiguous()
    halfway = (codebook[:100] + codebook[100:200]) / 2
    vectors = torch.cat([base[:50] + 1e-3 * torch.randn(50, D, generator=g), halfway, base[:1].repeat(5, 1),
                         3 * torch.randn(60, D, generator=g)])
    return vectors, codebook


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_the_compiled_loop_gives_the_exact_codes_at_any_thread_count(threads):
    vectors, codebook = crowded_case()
    expected = per_depth_codes(vectors, codebook, 5)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for block_rows in (1, 50, 256):
            codes = residual_codes(vectors, codebook, 5, block_rows, gram=codebook @ codebook.t())
            assert torch.equal(codes, expected)
    finally:
        torch.set_num_threads(before)
    torch_loop = residual_codes(vectors, codebook, 5, gram=codebook @ codebook.t(), compiled=False)
    assert torch.equal(torch_loop, expected)


def test_concurrent_callers_each_get_their_own_codes():
    g = torch.Generator().manual_seed(3)
    codebook = torch.randn(1024, 64, generator=g)
    gram = codebook @ codebook.t()
    inputs = [torch.randn(200, 64, generator=g) * (1 + i) for i in range(4)]
    expected = [per_depth_codes(x, codebook, 4) for x in inputs]
    results, errors = [None] * 4, []

    def work(i):
        try:
            for _ in range(3):
                results[i] = residual_codes(inputs[i], codebook, 4, 64, gram=gram)
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    workers = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert not errors
    assert all(torch.equal(r, e) for r, e in zip(results, expected))


def test_the_kernel_serves_only_what_it_can_and_the_torch_loop_the_rest():
    codebook = torch.randn(256, 64)
    gram = codebook @ codebook.t()
    assert _search_kernel(256, torch.randn(4, 64), codebook, gram) is search_kernel
    assert _search_kernel(256, torch.randn(4, 64).double(), codebook.double(), gram.double()) is None
    assert _search_kernel(256, torch.randn(4, 64, requires_grad=True), codebook) is None
    assert _search_kernel(250, torch.randn(4, 64), codebook) is None  # K not a multiple of the scan's lanes
    odd = torch.randn(250, 64)
    x = torch.randn(30, 64)
    assert torch.equal(residual_codes(x, odd, 3, gram=odd @ odd.t()), per_depth_codes(x, odd, 3))


@pytest.mark.parametrize("threads", [1, 2])
def test_per_depth_codebooks_are_searched_exactly_by_the_compiled_loop(threads, monkeypatch):
    """The pixel vocabulary's kind (a codebook per depth): the eval forward's codes equal the per-depth torch search
    depth by depth, on near-ties too, and equal the forward with the compiled search switched off."""
    config = QuantizerConfig(codebook_size=512, code_dim=16, depth=4, codebook_sharing="per_depth")
    quantizer = ResidualQuantizer(config).eval()
    vectors, shared = crowded_case(K=512, D=16, seed=1)
    quantizer.codebook.copy_(torch.stack([shared, shared.flip(0), shared.roll(7, 0), shared * 0.5]))
    x = torch.cat([vectors, quantizer.codebook[2, :20] + quantizer.codebook[3, 20:40]])
    residual, expected = x.clone(), []
    for q in range(4):
        expected.append(nearest_codes(residual, quantizer.codebook[q]))
        residual -= quantizer.codebook[q][expected[-1]]
    expected = torch.stack(expected, 1)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        assert torch.equal(quantizer(x).codes, expected)
    finally:
        torch.set_num_threads(before)
    monkeypatch.setattr(search_kernel, "available", lambda: False)
    assert torch.equal(quantizer(x).codes, expected)


def test_the_first_pass_gives_the_same_codes_through_onnx_runtime_or_torch(monkeypatch):
    """The first pass's GEMM runs in the search's threads through ONNX Runtime where it is installed, else as one
    torch.mm: either way the codes are the exact ones, on near-ties too."""
    vectors, codebook = crowded_case(seed=2)
    gram = codebook @ codebook.t()
    expected = per_depth_codes(vectors, codebook, 5)
    assert search_kernel._gemm_session() is not None  # onnxruntime is a dependency
    assert (search_kernel.cache_root() / "onnx" / search_kernel.MATMUL_GRAPH).is_file()
    assert torch.equal(residual_codes(vectors, codebook, 5, 64, gram=gram), expected)
    monkeypatch.setattr(search_kernel, "_gemm", False)  # as without onnxruntime
    assert torch.equal(residual_codes(vectors, codebook, 5, 64, gram=gram), expected)


@pytest.mark.parametrize("threads", [1, 2])
def test_the_threaded_matmul_is_a_float32_matmul(threads, monkeypatch):
    g = torch.Generator().manual_seed(4)
    a, b = torch.randn(301, 112, generator=g), torch.randn(112, 640, generator=g)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        product = search_kernel.matmul(a, b.t().contiguous().t())  # any strides
    finally:
        torch.set_num_threads(before)
    torch.testing.assert_close(product, a.double().mm(b.double()).float(), rtol=0, atol=1e-4)
    monkeypatch.setattr(search_kernel, "_gemm", False)
    torch.testing.assert_close(search_kernel.matmul(a, b), a @ b)


def test_the_gram_matrix_is_stored_when_built_a_second_time_and_mapped_from_then_on(tmp_path, monkeypatch):
    """A codebook met once (training's evaluations) leaves a marker only; built again (the next command), its Gram
    matrix is stored, and from then on mapped instead of built, with the same codes. A damaged file is ignored."""
    monkeypatch.setenv("DUALTOKEN_CACHE", str(tmp_path))
    vectors, codebook = crowded_case(seed=5)
    expected = per_depth_codes(vectors, codebook, 4)
    assert search_kernel.stored_gram(codebook) is None
    first = search_kernel.gram_matrix(codebook)  # the first build: a marker
    files = sorted(p.name for p in (tmp_path / "gram").iterdir())
    assert len(files) == 1 and files[0].endswith(".seen")
    second = search_kernel.gram_matrix(codebook)  # the second: stored on a worker thread
    search_kernel._storing.submit(lambda: None).result()  # wait for the write
    mapped = search_kernel.stored_gram(codebook)
    assert mapped is not None and torch.equal(mapped, second) and torch.equal(first, second)
    torch.testing.assert_close(mapped, codebook.double().mm(codebook.double().t()).float(), rtol=0, atol=1e-4)
    assert torch.equal(residual_codes(vectors, codebook, 4, gram=mapped), expected)
    q = ResidualQuantizer(QuantizerConfig(codebook_size=512, code_dim=80, depth=4)).eval()
    q.codebook.copy_(codebook)
    assert torch.equal(q(vectors[:3]).codes, expected[:3])  # 3 rows: too few to build it, but it is mapped
    assert q._gram_cache.gram is not None
    other = codebook.clone()
    other[0, 0] += 1
    assert search_kernel.stored_gram(other) is None  # another codebook, another file
    path = next((tmp_path / "gram").glob("*.npy"))
    path.write_bytes(path.read_bytes()[:1000])  # truncated
    assert search_kernel.stored_gram(codebook) is None
