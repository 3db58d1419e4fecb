"""Which floating-point precision a run uses: one setting, ``auto`` | ``fp32`` | ``bf16`` | ``fp16``.

``auto`` is bf16 autocast on CUDA and on a CPU whose torch build reports AMX tiles, float32 elsewhere: on a CPU
without bf16 units torch emulates bf16 matrix products, far slower than float32 (measured on an AVX2-only AMD
EPYC: about 1 against 60 GFLOP/s). A CPU with AVX-512 BF16 but no AMX tiles (AMD EPYC Zen 5) runs bf16 fast
(docs/PERFORMANCE.md: the EfficientNet-Lite0 tower 3.1x its float32 speed), but ``auto`` stays float32 there until
the suite's float32 assumptions are checked on such a CPU; ``bf16`` asked for explicitly runs on it. Training,
inference and the command line all resolve the setting here.
"""

from __future__ import annotations

from contextlib import AbstractContextManager

import torch

from .errors import ConfigError

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
INFERENCE_PRECISIONS = ("auto", "fp32", "bf16")  # the command line's --precision

_inference_precision = "auto"


def cpu_bf16_flags() -> dict[str, bool]:
    """The CPU features torch reports that decide bf16 speed: AMX tiles, AVX-512 BF16, AVX-512, AVX2."""
    cpu = torch.cpu
    probes = {
        "amx_tile": "_is_amx_tile_supported",
        "avx512_bf16": "_is_avx512_bf16_supported",
        "avx512": "_is_avx512_supported",
        "avx2": "_is_avx2_supported",
    }
    return {name: bool(getattr(cpu, probe, lambda: False)()) for name, probe in probes.items()}


def cpu_has_bf16_matmul() -> bool:
    """True where this CPU multiplies bf16 matrices in hardware (AMX tiles or AVX-512 BF16): ``bf16`` may run."""
    flags = cpu_bf16_flags()
    return flags["amx_tile"] or flags["avx512_bf16"]


def cpu_prefers_bf16() -> bool:
    """True where ``auto`` picks bf16 on this CPU: AMX tiles."""
    return cpu_bf16_flags()["amx_tile"]


def autocast_dtype(precision: str, device: torch.device | str) -> torch.dtype | None:
    """The autocast dtype of a ``precision`` setting on ``device`` (None: float32 throughout).

    Raises ConfigError for an unknown setting, and for ``bf16`` / ``fp16`` on a CPU that cannot run them fast.
    """
    device = torch.device(device)
    check_precision(precision)
    if precision == "auto":
        if device.type == "cuda" or (device.type == "cpu" and cpu_prefers_bf16()):
            return torch.bfloat16
        return None
    if precision == "bf16" and device.type == "cpu" and not cpu_has_bf16_matmul():
        raise ConfigError(
            "precision bf16 needs a CPU with bf16 matrix units (AMX or AVX-512 BF16); this one has none: "
            "use auto or fp32"
        )
    if precision == "fp16" and device.type == "cpu":
        raise ConfigError("precision fp16 is for CUDA devices; on a CPU use auto, fp32 or bf16")
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def describe(dtype: torch.dtype | None) -> str:
    """How a run states its precision once: ``bf16 autocast`` or ``float32``."""
    return "float32" if dtype is None else f"{str(dtype).removeprefix('torch.').replace('bfloat16', 'bf16')} autocast"


def check_precision(precision: str, choices: tuple[str, ...] = PRECISIONS) -> str:
    """``precision`` itself when it is one of ``choices``; ConfigError (one line) otherwise."""
    if precision not in choices:
        raise ConfigError(f"unknown precision {precision!r}; expected one of {', '.join(choices)}")
    return precision


def set_inference_precision(precision: str) -> None:
    """The precision of ``DualTokenizer.encode`` / ``decode`` where neither the call nor the model sets one."""
    global _inference_precision
    _inference_precision = check_precision(precision)


def inference_precision() -> str:
    """The process default of inference precision (``auto`` unless :func:`set_inference_precision` changed it)."""
    return _inference_precision


def inference_autocast(precision: str | None, device: torch.device | str) -> AbstractContextManager:
    """The autocast context of inference under ``precision`` (None: the process default) on ``device``: bf16 (or
    fp16) autocast, or autocast switched off for float32. Raises ConfigError as :func:`autocast_dtype` does."""
    device = torch.device(device)
    dtype = autocast_dtype(precision or inference_precision(), device)
    return torch.autocast(device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None)


def explain(precision: str, device: torch.device | str) -> str:
    """One line naming what ``precision`` resolves to on ``device`` and why, e.g. ``float32 (auto: this CPU has no
    bf16 matrix units: amx_tile no, avx512_bf16 no)``. Raises ConfigError as :func:`autocast_dtype` does."""
    device = torch.device(device)
    dtype = autocast_dtype(precision, device)
    if precision != "auto":
        return f"{describe(dtype)} ({precision})"
    if device.type != "cpu":
        return f"{describe(dtype)} (auto on {device.type})"
    flags = cpu_bf16_flags()
    found = ", ".join(f"{name} {'yes' if flags[name] else 'no'}" for name in ("amx_tile", "avx512_bf16"))
    if dtype is not None:
        units = "has AMX bf16 tiles"
    elif cpu_has_bf16_matmul():
        units = "has AVX-512 BF16 but no AMX tiles (auto stays float32; ask for bf16 to use them)"
    else:
        units = "has no bf16 matrix units"
    return f"{describe(dtype)} (auto: this CPU {units}: {found})"
