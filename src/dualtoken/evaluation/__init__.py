"""Evaluation: protocol-pinned reconstruction, perceptual, distribution and semantic metrics, codebook usage,
rate-distortion over depths and token stability, written as report.json, report.md and PNG figures.

``evaluate(model, data, out_dir)`` is the whole of ``dualtoken eval``; see docs/EVALUATION.md.
"""

from __future__ import annotations

from typing import Any

from .config import METRIC_GROUPS, EvalConfig
from .report import REQUIRED_KEYS, SCHEMA, build_report, render_markdown, write_report


def __getattr__(name: str) -> Any:
    """``evaluate`` loads the metric networks' libraries (torchmetrics, matplotlib) only when first asked for."""
    if name in ("evaluate", "PARTIAL_DIR"):
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "evaluate",
    "EvalConfig",
    "METRIC_GROUPS",
    "SCHEMA",
    "REQUIRED_KEYS",
    "build_report",
    "render_markdown",
    "write_report",
]
