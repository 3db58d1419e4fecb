"""``evaluate``: the whole of ``dualtoken eval`` as one function (re-exported by ``dualtoken.evaluation``)."""


from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch

from .config import EvalConfig
from .distributed import rank_and_world
from .figures import codebook_usage_figure, rate_distortion_figure, reconstruction_grid_figure
from .report import build_report, write_per_image_csv, write_report
from .runner import load_model, run_evaluation

if TYPE_CHECKING:
    from ..tokenizer import DualTokenizer

# inside the output folder: each process's partial state while a run is under way (removed when it completes)
PARTIAL_DIR = ".partial"


def evaluate(
    model: DualTokenizer | str | Path,
    data: str | Path,
    out_dir: str | Path | None = None,
    config: EvalConfig | None = None,
    *,
    device: str | torch.device | None = None,
    progress: bool = True,
) -> dict:
    """Evaluate a tokenizer on a data set and return the report dict.

    ``model``: a DualTokenizer, a folder written by ``save_pretrained``, or an embedded model's name.
    ``data``: an image folder, a file list, or WebDataset shards (see ``dualtoken.data.resolve_source``).
    Under torchrun (``torch.distributed`` initialised) every process evaluates its share and all return the same
    report; only rank 0 writes ``report.json``, ``report.md``, ``per_image.csv`` and the PNG figures into
    ``out_dir``. An interrupted run started again with the same ``out_dir``, model, data and config continues where
    it stopped.
    """
    config = config or EvalConfig()
    device = torch.device(device) if device is not None else _default_device()
    tokenizer = load_model(model, device)
    loaded_from = tokenizer.name_or_path or tokenizer.model_dir  # what from_pretrained was given, if it was
    source = str(model) if isinstance(model, (str, Path)) else str(loaded_from or "in memory")
    partial_dir = Path(out_dir) / PARTIAL_DIR if out_dir is not None else None
    results = run_evaluation(tokenizer, data, config, device, progress, partial_dir)
    report = build_report(results, tokenizer, source, config, str(device))
    if out_dir is not None and rank_and_world()[0] == 0:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        figures = {
            "rate_distortion": rate_distortion_figure(
                results["pixel_rows"], results["semantic_rows"], out_dir / "rate_distortion.png"
            )
            if config.wants("rate_distortion")
            else None,
            "codebook_usage": codebook_usage_figure(
                results["histograms"], config.histogram_bins, out_dir / "codebook_usage.png"
            )
            if "histograms" in results
            else None,
            "reconstruction_grid": reconstruction_grid_figure(
                results["best"], results["worst"], out_dir / "reconstruction_grid.png"
            ),
        }
        report["figures"] = {name: path.name for name, path in figures.items() if path is not None}
        if results["per_image"]:
            report["tables"]["per_image"] = write_per_image_csv(results["per_image"], out_dir / "per_image.csv").name
        write_report(report, out_dir)
    return report


def _default_device() -> torch.device:
    if torch.cuda.is_available():
        rank_device = torch.cuda.current_device()
        return torch.device("cuda", rank_device)
    return torch.device("cpu")
