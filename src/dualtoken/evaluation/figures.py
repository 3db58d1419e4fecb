"""The report's PNG figures (matplotlib, Agg backend): rate-distortion curves, codebook usage, best/worst grid."""

from __future__ import annotations

import math
import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from .extremes import Example  # noqa: E402

NOT_PLOTTED = ("depth",)


def _save(figure, path: Path) -> Path:
    tmp = path.with_name(f".{path.stem}.tmp{os.getpid()}.png")
    figure.savefig(tmp, dpi=110, bbox_inches="tight")
    plt.close(figure)
    os.replace(tmp, path)
    return path


def rate_distortion_figure(pixel_rows: list[dict], semantic_rows: list[dict], path: Path) -> Path | None:
    """One panel per metric: its value when decoding / pooling with the first k depths."""
    panels = [("pixel", rows, name) for rows in (pixel_rows,) if rows for name in rows[0] if name not in NOT_PLOTTED
              and not name.endswith("_std")]
    panels += [("semantic", semantic_rows, name) for name in (semantic_rows[0] if semantic_rows else {})
               if name not in NOT_PLOTTED]
    if not panels:
        return None
    columns = min(4, len(panels))
    figure, axes = plt.subplots(math.ceil(len(panels) / columns), columns, figsize=(3.2 * columns,
                                2.6 * math.ceil(len(panels) / columns)), squeeze=False)
    for axis, (branch, rows, name) in zip(axes.flat, panels, strict=False):
        depths = [row["depth"] for row in rows]
        axis.plot(depths, [row[name] for row in rows], marker="o")
        axis.set_title(f"{name}", fontsize=9)
        axis.set_xlabel(f"{branch} depths used (k)", fontsize=8)
        axis.set_xticks(depths)
        axis.grid(alpha=0.3)
    for axis in list(axes.flat)[len(panels):]:
        axis.axis("off")
    figure.suptitle("rate-distortion: first k of Q depths")
    figure.tight_layout()
    return _save(figure, path)


def codebook_usage_figure(histograms: dict[str, torch.Tensor], bins: int, path: Path) -> Path:
    """Per vocabulary, a histogram of how often each code is used (all depths pooled), dead codes at 0."""
    figure, axes = plt.subplots(1, len(histograms), figsize=(5 * len(histograms), 3.2), squeeze=False)
    for axis, (branch, table) in zip(axes.flat, histograms.items(), strict=True):
        counts = table.sum(dim=0).double().numpy()
        used = counts[counts > 0]
        edges = np.logspace(0, math.log10(max(used.max(), 10.0)) + 1e-9, bins + 1) if used.size else np.array([1, 10])
        axis.hist(used, bins=edges, color="tab:blue")
        axis.set_xscale("log")
        axis.set_xlabel("uses of a code (all depths)")
        axis.set_ylabel("codes")
        dead = int((counts == 0).sum())
        axis.set_title(f"{branch}: {counts.size - dead}/{counts.size} codes used, {dead} dead", fontsize=9)
        axis.grid(alpha=0.3)
    figure.tight_layout()
    return _save(figure, path)


def reconstruction_grid_figure(best: list[Example], worst: list[Example], path: Path) -> Path | None:
    """Rows of (original, reconstruction): the best images by PSNR first, then the worst."""
    examples = [("best", e) for e in best] + [("worst", e) for e in worst]
    if not examples:
        return None
    figure, axes = plt.subplots(len(examples), 2, figsize=(5, 2.5 * len(examples)), squeeze=False)
    for row, (kind, example) in enumerate(examples):
        axes[row, 0].imshow(example.original)
        axes[row, 1].imshow(example.reconstruction)
        axes[row, 0].set_title(f"{kind}: {example.id}", fontsize=7)
        axes[row, 1].set_title(f"reconstruction, PSNR {example.score:.2f} dB", fontsize=7)
        for axis in axes[row]:
            axis.axis("off")
    figure.tight_layout()
    return _save(figure, path)


def learning_curve_figure(
    curves: dict[str, list[tuple[float, float]]], x_label: str, y_label: str, path: Path, title: str = ""
) -> Path:
    """One line per run of ``(x, y)`` points (e.g. Kodak PSNR against training images seen)."""
    if not any(curves.values()):
        raise ValueError("no points to plot: every curve is empty")
    figure, axis = plt.subplots(figsize=(5.5, 3.4))
    for label, points in curves.items():
        if points:
            xs, ys = zip(*sorted(points), strict=True)
            axis.plot(xs, ys, marker="o", markersize=3, label=label)
    axis.set_xlabel(x_label)
    axis.set_ylabel(y_label)
    axis.set_title(title, fontsize=9)
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    figure.tight_layout()
    return _save(figure, path)
