"""Which engine runs a tokenizer's inference: one setting, ``auto`` | ``torch`` | ``onnxruntime``.

``DualTokenizer.encode`` and ``decode`` ask this module for a runtime and use it when there is one, so the command
line, ``serve``, ``eval`` and the data pipeline get the fast path with no code of their own. What runs where:

- ``onnxruntime``: the tower up to both taps with the down-projections (image -> latents) and the pixel decoder
  (codes -> image) run as ONNX graphs in ONNX Runtime; the residual search stays this package's exact search in
  torch, so codes are the exact nearest ones for the latents the graph computes (a code can differ from eager
  float32 only where a latent moved across a cell boundary). The graphs are exported once per model and kept in a
  cache folder (``DUALTOKEN_CACHE``, default ``~/.cache/dualtoken/onnx``), keyed by a digest of the weights.
- ``torch``: PyTorch eager, the only engine of training, of the parity tests and of GPUs.
- ``auto``: ``onnxruntime`` for a model in eval mode on a CPU when the package is installed and the precision
  setting leaves float32 (measured in docs/PERFORMANCE.md: ONNX Runtime's float32 runs this tower several times
  faster than eager float32, and faster than eager bf16 on an AVX-512 BF16 CPU); ``torch`` otherwise. Where the
  fast path cannot start (ONNX Runtime missing, an op the exporter cannot write), auto falls back to eager with one
  :class:`BackendWarning` naming why, never a traceback.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import tempfile
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from .errors import ConfigError

if TYPE_CHECKING:
    from .tokenizer import DualTokenizer

BACKENDS = ("auto", "torch", "onnxruntime")

_inference_backend = "auto"
_lock = threading.Lock()  # one export at a time per process (serve's worker threads share a model)
_pool: ThreadPoolExecutor | None = None  # the CPU path's worker threads (the graphs' batches, the exact search)
_pool_threads = 0


class BackendWarning(UserWarning):
    """The fast path could not start and inference runs eager (the message says why)."""


def check_backend(backend: str) -> str:
    """``backend`` itself when it is known, and installed where it needs a package; ConfigError (one line) else."""
    if backend not in BACKENDS:
        raise ConfigError(f"unknown backend {backend!r}; expected one of {', '.join(BACKENDS)}")
    if backend == "onnxruntime" and not onnxruntime_available():
        raise ConfigError(
            "backend onnxruntime is not installed: pip install 'onnxruntime>=1.20,<1.33' 'onnx>=1.17,<1.24', "
            "or use --backend torch"
        )
    return backend


def onnxruntime_available() -> bool:
    """Whether onnx (the exporter's) and onnxruntime are installed; found, not imported (onnx alone takes 0.4 s to
    import, and a command with its graphs cached never needs it)."""
    return all(importlib.util.find_spec(name) is not None for name in ("onnx", "onnxruntime"))


def set_inference_backend(backend: str) -> None:
    """The backend of ``DualTokenizer.encode`` / ``decode`` where neither the call nor the model sets one."""
    global _inference_backend
    _inference_backend = check_backend(backend)


def inference_backend() -> str:
    """The process default (``auto`` unless :func:`set_inference_backend` changed it)."""
    return _inference_backend


def resolve_backend(backend: str, device: torch.device | str, precision: str = "auto") -> str:
    """What ``backend`` becomes on ``device`` under ``precision``: ``torch`` or ``onnxruntime``. Raises
    ConfigError for an unknown or uninstalled backend, and for onnxruntime with a bf16/fp16 precision."""
    check_backend(backend)
    device = torch.device(device)
    if backend == "onnxruntime":
        if device.type != "cpu":
            raise ConfigError(f"backend onnxruntime runs on the CPU; this model is on {device.type}: use torch")
        if precision in ("bf16", "fp16"):
            raise ConfigError(f"backend onnxruntime runs float32; precision {precision} needs --backend torch")
        return backend
    if backend == "torch" or device.type != "cpu" or precision in ("bf16", "fp16") or not onnxruntime_available():
        return "torch"
    return "onnxruntime"


def explain_backend(backend: str, device: torch.device | str, precision: str = "auto") -> str:
    """One line naming what ``backend`` resolves to and why, e.g. ``onnxruntime (auto: ONNX Runtime 1.32.0 on
    the CPU)``."""
    chosen = resolve_backend(backend, device, precision)
    if backend != "auto":
        return f"{chosen} ({backend})"
    device = torch.device(device)
    if chosen == "onnxruntime":
        import onnxruntime

        return f"onnxruntime (auto: ONNX Runtime {onnxruntime.__version__} on the CPU)"
    if device.type != "cpu":
        why = f"{device.type} runs PyTorch"
    elif precision in ("bf16", "fp16"):
        why = f"precision {precision} runs in PyTorch"
    else:
        why = "onnxruntime is not installed"
    return f"torch (auto: {why})"


# ----------------------------------------------------------------------------------------------------------------
# the ONNX Runtime path
# ----------------------------------------------------------------------------------------------------------------


def runtime_for(tokenizer: DualTokenizer, device: torch.device, backend: str | None, precision: str) -> OnnxRuntime | None:
    """The ONNX Runtime of ``tokenizer`` when ``backend`` (None: the model's, else the process default) resolves
    to it for a model in eval mode; None for eager. A runtime that cannot start under ``auto`` warns once and
    leaves the model eager; under an explicit ``onnxruntime`` its error is raised."""
    backend = backend or tokenizer.backend or inference_backend()
    if tokenizer.training or resolve_backend(backend, device, precision) == "torch":
        return None
    state = tokenizer.__dict__.setdefault("_runtime_state", {})
    fingerprint = weights_version(tokenizer)
    if state.get("fingerprint") != fingerprint:
        with _lock:
            if state.get("fingerprint") != fingerprint:
                try:
                    state["runtime"] = OnnxRuntime(tokenizer)
                except Exception as exc:  # export or session failures: any error of torch.onnx or onnxruntime
                    if backend != "auto":
                        raise ConfigError(f"backend onnxruntime could not start: {_one_line(exc)}") from exc
                    warnings.warn(
                        f"backend: torch (onnxruntime could not start: {_one_line(exc)})", BackendWarning,
                        stacklevel=3,
                    )
                    state["runtime"] = None
                state["fingerprint"] = fingerprint
    return state["runtime"]


def weights_version(tokenizer: torch.nn.Module) -> tuple:
    """Changes whenever a weight is replaced or modified in place (torch's per-tensor version counters)."""
    return tuple((t.data_ptr(), t._version) for t in tokenizer.state_dict(keep_vars=True).values())


def graphs_key(tokenizer: DualTokenizer) -> str:
    """The cache key of a model's graphs: its config, this torch version (the exporter) and every weight."""
    from .checkpoint import weights_digest

    key = hashlib.blake2b(f"{tokenizer.config!r}|{torch.__version__}|{weights_digest(tokenizer)}".encode(), digest_size=16)
    return key.hexdigest()


def cache_root() -> Path:
    """The folder of what the CPU path caches (``$DUALTOKEN_CACHE``, default ``~/.cache/dualtoken``)."""
    return Path(os.environ.get("DUALTOKEN_CACHE", Path.home() / ".cache" / "dualtoken"))


def cache_dir() -> Path:
    """The ONNX graphs' folder under :func:`cache_root`."""
    return cache_root() / "onnx"


def split_rows(work, *arrays):
    """``[work(*row slices of arrays), ...]`` with the rows (the first dimension, the same in every array) split in
    ``torch.get_num_threads()`` contiguous parts, each on its own thread; the parts' results in row order. ``work``
    must release the GIL (compiled code, ONNX Runtime) for the threads to run at once."""
    global _pool, _pool_threads
    rows = arrays[0].shape[0]
    threads = max(1, min(torch.get_num_threads(), rows))
    if threads == 1:
        return [work(*arrays)]
    if _pool is None or _pool_threads < threads:
        _pool, _pool_threads = ThreadPoolExecutor(threads, thread_name_prefix="dualtoken-cpu"), threads
    bounds = [round(i * rows / threads) for i in range(threads + 1)]
    futures = [_pool.submit(work, *(a[start:end] for a in arrays)) for start, end in zip(bounds, bounds[1:])]
    return [future.result() for future in futures]


def _forget_pool() -> None:
    """A forked child has none of its parent's threads: it starts its own pool."""
    global _pool, _pool_threads
    _pool, _pool_threads = None, 0


os.register_at_fork(after_in_child=_forget_pool)


class OnnxRuntime:
    """ONNX Runtime sessions of one tokenizer's two graphs: image -> latents at both taps, pixel codes -> image.

    A batch of at least as many images as threads is split across the threads, each image run by a one-thread
    session on its own core (on 2 cores about 1.1x one session with two intra-op threads, docs/PERFORMANCE.md); a
    smaller batch runs on one session with every thread, for the latency of a single image."""

    TAPS = "taps.onnx"
    PIXELS = "pixels.onnx"

    def __init__(self, tokenizer: DualTokenizer) -> None:
        import onnxruntime as ort

        from .export import export_pixels_graph, export_taps_graph

        folder = cache_dir() / graphs_key(tokenizer)
        with torch.inference_mode(False):  # the exporter traces: no inference tensors, even inside a caller's mode
            for name, writer in ((self.TAPS, export_taps_graph), (self.PIXELS, export_pixels_graph)):
                if not (folder / name).is_file():
                    write_atomically(folder / name, lambda path, writer=writer: writer(tokenizer, path))
        self.threads = torch.get_num_threads()
        self.sessions = {}  # (graph, intra-op threads) -> session
        for name in (self.TAPS, self.PIXELS):
            for threads in {self.threads, 1}:
                options = ort.SessionOptions()
                options.intra_op_num_threads = threads
                options.inter_op_num_threads = 1
                # no busy-waiting between runs: the exact search runs on the same cores right after each graph
                options.add_session_config_entry("session.intra_op.allow_spinning", "0")
                options.log_severity_level = 3
                self.sessions[name, threads] = ort.InferenceSession(
                    str(folder / name), options, providers=["CPUExecutionProvider"]
                )
        self.folder = folder

    def _run(self, graph: str, name: str, batch: np.ndarray) -> list[np.ndarray]:
        """The graph's outputs of ``batch``, split across the threads when it has an image for each."""
        if batch.shape[0] < self.threads:
            return self.sessions[graph, self.threads].run(None, {name: batch})
        parts = split_rows(lambda part: self.sessions[graph, 1].run(None, {name: part}), batch)
        return [np.concatenate(outputs) for outputs in zip(*parts)]

    def latents(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Images (B, 3, H, W) -> (pixel latent, semantic latent), each (B, h*w, D) float32."""
        pixel, semantic = self._run(self.TAPS, "images", _numpy(images))
        return torch.from_numpy(pixel), torch.from_numpy(semantic)

    def decode(self, pixel_codes: torch.Tensor) -> torch.Tensor:
        """Pixel codes (B, h, w, k) -> images (B, 3, H, W) float32, unclamped."""
        (images,) = self._run(self.PIXELS, "pixel_codes", _numpy(pixel_codes.long()))
        return torch.from_numpy(images)


def _numpy(tensor: torch.Tensor) -> np.ndarray:
    return np.ascontiguousarray(tensor.detach().cpu().numpy())


def write_atomically(path: Path, write) -> None:
    """``write(temporary path)`` then rename: a reader never sees half a graph, concurrent writers are harmless."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, suffix=".part")
    os.close(handle)
    try:
        write(Path(temporary))
        os.chmod(temporary, 0o644)
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:300]
