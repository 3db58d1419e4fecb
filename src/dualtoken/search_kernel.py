"""The exact residual search's depth loop over the Gram matrix as one compiled pass per row and depth (CPU).

:func:`dualtoken.quantizer.residual_codes` scores every code of a row once by a float32 matmul and then updates the
scores depth after depth from the Gram matrix, ``s_{q+1} = s_q + G[c_q]``. In PyTorch that is five passes over the
(rows, K) score block per depth (gather the Gram rows, add them, the group minima, the runner-up, the candidates);
here, compiled by numba, it is one pass per row and depth that adds the Gram row and keeps, per SIMD lane, the
smallest score, where it is and the second smallest, so each score is read and written once while it is in cache,
and the Gram row is the only memory the pass must stream.

The decision is the same as :func:`dualtoken.quantizer.settle_codes`: a row whose runner-up scores more than twice the
rounding bound above its best takes the best (the first index on ties); the others measure every code within that
window in float64 and take the nearest, the lowest code on ties. So the codes are the exact nearest ones, as the
PyTorch loop's are.

The first pass's matmul (``-r.E^T``, 2 R K D FLOP) runs in the same threads, each on its own rows, through ONNX
Runtime's float32 GEMM (MLAS) on the calling thread: about twice PyTorch's MKL at these shapes on the CPUs measured
(docs/PERFORMANCE.md), and no second pool of OpenMP threads spinning on the cores the compiled loop needs. Without
ONNX Runtime it is one ``torch.mm`` before the rows are split. Any float32 GEMM keeps the search exact: the rounding
bound holds for every order of summation.

Rows are split across ``torch.get_num_threads()`` Python threads (the compiled function releases the GIL), so no
numba threading layer is involved and concurrent callers (``serve``'s workers) are safe. The compiled code is cached
under ``$NUMBA_CACHE_DIR`` (by default ``~/.cache/dualtoken/numba``), so a new process loads it in a fraction of a
second instead of compiling for a few seconds. Without numba, :func:`available` is False and the PyTorch loop runs.
"""

from __future__ import annotations

import hashlib
import math
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from .backend import cache_root, onnxruntime_available, split_rows, write_atomically

os.environ.setdefault("NUMBA_CACHE_DIR", str(cache_root() / "numba"))  # read when numba is imported, below
try:
    from numba import njit
except ImportError:  # pragma: no cover - numba is a dependency; this keeps the PyTorch loop working without it
    njit = None

# scores kept per SIMD lane by the scan: lane l sees columns l, l + LANES, l + 2 LANES, ... (4 AVX-512 registers)
LANES = 64


def available() -> bool:
    """Whether the compiled depth loop can run here (numba imports)."""
    return njit is not None


def _add_and_scan(scores, gram_row, best, second, chunk_of_best):  # pragma: no cover - compiled
    """``scores += gram_row`` (K,), and per lane l: its smallest score ``best[l]``, the chunk (column // LANES) of its
    first occurrence ``chunk_of_best[l]``, and its second smallest ``second[l]``. Element-wise selects only, so the
    compiler vectorises the loop (min / max need no NaN handling: scores are finite)."""
    best[:] = np.inf
    second[:] = np.inf
    chunk_of_best[:] = 0
    for chunk in range(scores.shape[0] // LANES):
        base = chunk * LANES
        for lane in range(LANES):
            score = scores[base + lane] + gram_row[base + lane]
            scores[base + lane] = score
            smallest = best[lane]
            second[lane] = min(second[lane], max(smallest, score))
            chunk_of_best[lane] = chunk if score < smallest else chunk_of_best[lane]
            best[lane] = min(smallest, score)


def _decide(score, best, second, chunk_of_best, slack, vector, codebook):  # pragma: no cover - compiled
    """The exact nearest code of ``vector`` from its ``score`` row after :func:`_add_and_scan`, each score within
    ``slack`` of its exact value: the best when the runner-up is more than twice the slack above it, else the
    nearest in float64 of the codes scoring at most that (the lowest code on ties)."""
    size = score.shape[0]
    top, top_code = np.inf, size  # the smallest score, the lowest code on ties
    for lane in range(LANES):
        candidate = chunk_of_best[lane] * LANES + lane
        if best[lane] < top or (best[lane] == top and candidate < top_code):
            top, top_code = best[lane], candidate
    runner_up = np.inf
    for lane in range(LANES):
        if chunk_of_best[lane] * LANES + lane != top_code:
            runner_up = min(runner_up, best[lane])
        runner_up = min(runner_up, second[lane])
    limit = top + 2 * slack
    if runner_up > limit:
        return top_code
    code, nearest = top_code, np.inf  # near-ties: the exact winner is among the codes scoring at most limit
    for k in range(size):
        if score[k] <= limit:
            distance = 0.0
            for d in range(vector.shape[0]):
                difference = np.float64(vector[d]) - np.float64(codebook[k, d])
                distance += difference * difference
            if distance < nearest:
                nearest, code = distance, k
    return code


def _gram_loop(scores, gram, codebook, half_sq, residual, codes, slack_unit, code_norms, largest):  # pragma: no cover
    """Codes (R, Q) of rows whose ``-r.e`` are ``scores`` (R, K) against one shared ``codebook`` (K, D): the first
    depth's scan adds ``half_sq`` = ||e||^2 / 2, each later one the Gram row of the code just taken; ``residual``
    (R, D) is consumed. ``slack_unit[q]`` is :func:`dualtoken.quantizer.float32_dot_slack` at depth q, to be
    multiplied by the square of (the norms the scores have seen + the largest code norm)."""
    best = np.empty(LANES, dtype=np.float32)
    second = np.empty(LANES, dtype=np.float32)
    chunk_of_best = np.empty(LANES, dtype=np.int64)
    for row in range(scores.shape[0]):
        score, vector = scores[row], residual[row]
        reach = math.sqrt(np.sum(vector.astype(np.float64) ** 2))
        code = 0
        for level in range(codes.shape[1]):
            if level:
                reach += code_norms[code]
            _add_and_scan(score, gram[code] if level else half_sq, best, second, chunk_of_best)
            slack = slack_unit[level] * (reach + largest) ** 2
            code = _decide(score, best, second, chunk_of_best, slack, vector, codebook)
            codes[row, level] = code
            vector -= codebook[code]


def _direct_loop(scores, codebooks_t, codebooks, half_sq, residual, codes, slack_unit, largest):  # pragma: no cover
    """Codes (R, Q) of ``residual`` (R, D) (consumed) against one codebook per depth, ``codebooks`` (Q, K, D) and
    their transposes ``codebooks_t`` (Q, D, K): per depth, the scores ``||e||^2 / 2 - r.e`` of a row in ``scores``
    (R, K; a work area) by one product per dimension over every code, then the same scan and decision.
    ``slack_unit`` is :func:`dualtoken.quantizer.float32_dot_slack` of the width, ``largest[q]`` depth q's largest
    code norm."""
    best = np.empty(LANES, dtype=np.float32)
    second = np.empty(LANES, dtype=np.float32)
    chunk_of_best = np.empty(LANES, dtype=np.int64)
    for row in range(residual.shape[0]):
        score, vector = scores[row], residual[row]
        for level in range(codes.shape[1]):
            book_t = codebooks_t[level]
            score[:] = 0.0
            for d in range(vector.shape[0]):
                weight = vector[d]
                for k in range(score.shape[0]):
                    score[k] -= weight * book_t[d, k]
            _add_and_scan(score, half_sq[level], best, second, chunk_of_best)
            slack = slack_unit * (math.sqrt(np.sum(vector.astype(np.float64) ** 2)) + largest[level]) ** 2
            code = _decide(score, best, second, chunk_of_best, slack, vector, codebooks[level])
            codes[row, level] = code
            vector -= codebooks[level, code]


if njit is not None:
    _add_and_scan = njit(fastmath={"nnan", "ninf"}, cache=True, nogil=True)(_add_and_scan)
    _decide = njit(cache=True, nogil=True)(_decide)
    _gram_loop = njit(cache=True, nogil=True)(_gram_loop)
    _direct_loop = njit(cache=True, nogil=True)(_direct_loop)

_gemm = None  # the ONNX Runtime session of one MatMul, opened on first use (False: none here)
MATMUL_GRAPH = "matmul-v1.onnx"


def _forget_session() -> None:
    """A forked child opens its own session."""
    global _gemm
    _gemm = None


def _gemm_session():
    """ONNX Runtime's session of ``product = a @ b`` (float32, any shapes), run on the calling thread (one intra-op
    thread: the callers are the search's own threads); None without ONNX Runtime. The 104-byte graph is written
    once by onnx into the cache folder, so later processes skip importing onnx."""
    global _gemm
    if _gemm is None:
        _gemm = False
        if onnxruntime_available():
            import onnxruntime as ort

            path = cache_root() / "onnx" / MATMUL_GRAPH
            graph: str | bytes = str(path)
            if not path.is_file():
                graph = _matmul_graph()
                try:
                    write_atomically(path, lambda temporary: temporary.write_bytes(graph))
                except OSError:  # a read-only cache folder: built again by the next process
                    pass
            options = ort.SessionOptions()
            options.intra_op_num_threads = options.inter_op_num_threads = 1
            options.log_severity_level = 3
            _gemm = ort.InferenceSession(graph, options, providers=["CPUExecutionProvider"])
    return _gemm or None


def _matmul_graph() -> bytes:
    """The serialized ONNX graph of ``product = a @ b``, a (n, d) and b (d, k) float32."""
    from onnx import TensorProto, helper

    def matrix(name: str, rows: str, columns: str):
        return helper.make_tensor_value_info(name, TensorProto.FLOAT, [rows, columns])

    graph = helper.make_graph([helper.make_node("MatMul", ["a", "b"], ["product"])], "matmul",
                              [matrix("a", "n", "d"), matrix("b", "d", "k")], [matrix("product", "n", "k")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()


def _gemm_into(session, a: np.ndarray, b: np.ndarray, out: np.ndarray) -> None:
    """``out[:] = a @ b`` (all C-contiguous float32) on this thread, the GIL released."""
    binding = session.io_binding()
    binding.bind_cpu_input("a", a)
    binding.bind_cpu_input("b", b)
    binding.bind_output("product", "cpu", element_type=np.float32, shape=out.shape, buffer_ptr=out.ctypes.data)
    session.run_with_iobinding(binding)


def matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` (float32 CPU tensors (N, D) and (D, K)) with a's rows split across the search's threads, each
    through ONNX Runtime's GEMM; ``torch.mm`` without ONNX Runtime. Builds the Gram matrix (16,384^2 x 112: 60 GFLOP)."""
    session = _gemm_session()
    if session is None:
        return torch.mm(a, b)
    a, b = a.contiguous(), b.contiguous()
    out = a.new_empty(a.shape[0], b.shape[1])
    _split_rows(lambda rows, part: _gemm_into(session, rows, b.numpy(), part), a, out)
    return out


os.register_at_fork(after_in_child=_forget_session)

GRAM_FOLDER = "gram"
_storing: ThreadPoolExecutor | None = None  # writes Gram matrices to the cache folder; joined at exit


def _gram_path(codebook: torch.Tensor) -> Path:
    digest = hashlib.blake2b(codebook.contiguous().numpy().tobytes(), digest_size=16).hexdigest()
    return cache_root() / GRAM_FOLDER / f"{digest}-{codebook.shape[0]}x{codebook.shape[1]}.npy"


def stored_gram(codebook: torch.Tensor) -> torch.Tensor | None:
    """The Gram matrix of ``codebook`` (K, D) as stored earlier (:func:`gram_matrix`), mapped
    copy-on-write from the cache folder: nothing is computed, only the rows the search reads are paged in, and
    processes of the same model share those pages. None when it is not there or not readable."""
    path = _gram_path(codebook)
    try:
        mapped = np.load(path, mmap_mode="c")
    except (OSError, ValueError):
        return None
    size = codebook.shape[0]
    return torch.from_numpy(mapped) if mapped.shape == (size, size) and mapped.dtype == np.float32 else None


def gram_matrix(codebook: torch.Tensor) -> torch.Tensor:
    """E E^T (K, K) of a float32 CPU ``codebook`` (K, D), built by :func:`matmul` (60 GFLOP and 1 GiB for the shipped
    semantic vocabulary). The second time the same codebook's matrix is built (in this process or another: the next
    command) it is also stored in the cache folder (on a worker thread, atomically), so every later process maps it
    (:func:`stored_gram`); a codebook met once, as in training's evaluations, leaves only an empty marker file."""
    global _storing
    gram = matmul(codebook, codebook.t())
    path = _gram_path(codebook)
    seen = path.with_suffix(".seen")
    try:
        if not seen.is_file():
            seen.parent.mkdir(parents=True, exist_ok=True)
            seen.touch()
        elif not path.is_file():
            _storing = _storing or ThreadPoolExecutor(1, thread_name_prefix="dualtoken-gram")
            _storing.submit(_store, path, gram.numpy())  # the search only reads it
    except OSError:  # a read-only cache folder: nothing stored
        pass
    return gram


def _store(path: Path, array: np.ndarray) -> None:
    def write(temporary: Path) -> None:
        with open(temporary, "wb") as file:
            np.save(file, array, allow_pickle=False)

    try:
        write_atomically(path, write)
    except OSError:  # a full disk: the next process builds it again
        pass


def gram_codes(
    residual: torch.Tensor,
    negated_t: torch.Tensor,
    gram: torch.Tensor,
    codebook: torch.Tensor,
    half_sq: torch.Tensor,
    code_norms: torch.Tensor,
    codes: torch.Tensor,
    slack_unit: list[float],
    scores: torch.Tensor,
) -> None:
    """Fill ``codes`` (R, Q) int64 of ``residual`` (R, D) against a shared codebook (K, D), its negated transpose
    ``negated_t`` (D, K) and its Gram matrix (K, K), all float32 CPU tensors (``half_sq`` (K,): ||e||^2 / 2;
    ``code_norms`` (K,): ||e||); ``residual`` is consumed, ``scores`` (R, K) is the work area."""
    norms = code_norms.double().numpy()
    shared = (gram.numpy(), codebook.numpy(), half_sq.numpy())
    after = (np.asarray(slack_unit, dtype=np.float64), norms, float(norms.max()))
    session = _gemm_session()
    if session is None:
        torch.mm(residual, negated_t, out=scores)
    book_t = negated_t.contiguous().numpy()

    def search(rows: np.ndarray, part: np.ndarray, codes_part: np.ndarray) -> None:
        if session is not None:
            _gemm_into(session, rows, book_t, part)  # -r.E^T
        _gram_loop(part, *shared, rows, codes_part, *after)

    _split_rows(search, residual, scores, codes)


def per_depth_codes(residual: torch.Tensor, codebooks: torch.Tensor, codes: torch.Tensor, slack_unit: float) -> None:
    """Fill ``codes`` (R, Q) int64 of ``residual`` (R, D) (overwritten) against one codebook per depth, ``codebooks``
    (Q, K, D), all float32 CPU tensors; ``slack_unit`` is the rounding bound of a width-D score."""
    half_sq = codebooks.pow(2).sum(dim=2).div(2)  # (Q, K)
    largest = half_sq.mul(2).sqrt().amax(dim=1).double()  # (Q,)
    scores = residual.new_empty(residual.shape[0], codebooks.shape[1])  # (R, K) a work area
    shared = (codebooks.transpose(1, 2).contiguous().numpy(), codebooks.contiguous().numpy(), half_sq.numpy())
    after = (slack_unit, largest.numpy())
    _split_rows(lambda rows, part, codes_part: _direct_loop(part, *shared, rows, codes_part, *after),
                residual, scores, codes)


def _split_rows(work, *tensors: torch.Tensor) -> None:
    """``work(*row slices as numpy arrays)`` of ``tensors`` (the same rows each), the rows split across the CPU
    path's threads (:func:`dualtoken.backend.split_rows`; the compiled loops and ONNX Runtime release the GIL)."""
    split_rows(work, *(t.numpy() for t in tensors))
