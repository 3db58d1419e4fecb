"""report.json (the schema below) and report.md (the same numbers as tables), written atomically.

report.json keys: ``schema``, ``created``, ``versions``, ``model``, ``data``, ``protocol``, ``config``,
``metrics`` (every number at full depth, with ``*_gap`` = quantized - unquantized accuracy), ``rate_distortion``
(``pixel`` / ``semantic`` rows, one per k), ``codebooks``, ``stability``, ``classifier``, ``extremes``,
``skipped_metrics``, ``caveats`` (metric -> why its value needs care at this number of images), ``figures``,
``tables`` (``per_image``: the CSV of per-image PSNR / SSIM), ``runtime``. A group that did not run is absent (its reason in
``skipped_metrics`` when it was asked for).
"""

from __future__ import annotations

import json
import math
import os
import platform
import sys
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

from ..config import to_dict
from .config import METRIC_GROUPS, EvalConfig
from .protocol import describe_protocol

SCHEMA = "dualtoken-eval/1"
PACKAGES = ("dualtoken", "torch", "torchmetrics", "transformers", "numpy", "pillow", "efficientnet-lite-pytorch",
            "webdataset", "torch-fidelity")
REQUIRED_KEYS = ("schema", "created", "versions", "model", "data", "protocol", "config", "metrics",
                 "rate_distortion", "skipped_metrics", "figures", "runtime")


def versions() -> dict[str, str]:
    found = {"python": sys.version.split()[0], "platform": platform.platform()}
    for name in PACKAGES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return found


def _model_section(tokenizer, source: str) -> dict:
    return {
        "source": source,
        "name": tokenizer.config.name,
        "backbone": tokenizer.config.backbone.kind,
        "image_size": list(tokenizer.image_size),
        "grid": list(tokenizer.grid),
        "pixel_depth": tokenizer.pixel_depth,
        "semantic_depth": tokenizer.semantic_depth,
        "codebook_size": {b: tokenizer.codebook_size(b) for b in ("pixel", "semantic")},
        "parameters": sum(p.numel() for p in tokenizer.parameters()),
    }


def build_report(results: dict, tokenizer, model_source: str, config: EvalConfig, device: str) -> dict:
    """The report dict from the evaluator's result sections."""
    pixel_rows, semantic_rows = results["pixel_rows"], results["semantic_rows"]
    metrics = {k: v for k, v in (pixel_rows[-1] if pixel_rows else {}).items() if k != "depth"}
    metrics.update({k: v for k, v in (semantic_rows[-1] if semantic_rows else {}).items() if k != "depth"})
    metrics.update(results["semantic_reference"])
    for name in list(metrics):
        unquantized = f"{name}_unquantized"
        if unquantized in metrics:
            metrics[f"{name}_gap"] = metrics[name] - metrics[unquantized]
    report = {
        "schema": SCHEMA,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "versions": versions(),
        "model": _model_section(tokenizer, model_source),
        "data": {
            "source": results["data_source"],
            "num_images": results["num_images"],
            "fingerprint": results["fingerprint"],
            "labels": results["labels_source"],
            "labeled_images": results["labeled_images"],
            "skipped_images": [{"index": n, "id": i, "reason": r} for n, i, r in results["skipped_images"]],
        },
        "protocol": describe_protocol(
            tokenizer.image_size,
            config.feature_resize,
            {group for group in METRIC_GROUPS if config.wants(group)},
            results["feature_nets"],
            results["classifier_kind"],
        ),
        "config": to_dict(config),
        "metrics": metrics,
        "rate_distortion": {"pixel": pixel_rows, "semantic": semantic_rows},
        "classifier": results["classifier"],
        "skipped_metrics": results["skipped_metrics"],
        "caveats": results["caveats"],
        "figures": {},
        "tables": {},
        "runtime": {"seconds": round(results["seconds"], 2), "world_size": results["world_size"], "device": device},
    }
    if results["kid"] is not None:
        report["protocol"]["kid"] = results["kid"]
    for key in ("codebooks", "stability"):
        if key in results:
            report[key] = results[key]
    report["extremes"] = {
        kind: [{"id": e.id, "index": e.index, "psnr": e.score} for e in results[kind]] for kind in ("best", "worst")
    }
    return report


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) < 1000 else f"{value:.1f}"
    return str(value)


def _table(rows: list[dict]) -> list[str]:
    if not rows:
        return []
    columns = list(dict.fromkeys(name for row in rows for name in row))
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_fmt(row.get(c, "")) for c in columns) + " |" for row in rows]
    return lines + [""]


def render_markdown(report: dict) -> str:
    model, data = report["model"], report["data"]
    lines = [
        f"# Evaluation of `{model['name']}` on `{data['source']}`",
        "",
        f"{data['num_images']} images (fingerprint `{data['fingerprint'][:16]}`), {model['image_size'][0]}x"
        f"{model['image_size'][1]} px, {model['grid'][0]}x{model['grid'][1]} tokens, pixel Q={model['pixel_depth']}"
        f" / semantic Q={model['semantic_depth']}, K={model['codebook_size']['pixel']}/"
        f"{model['codebook_size']['semantic']}. {report['runtime']['world_size']} process(es) on "
        f"{report['runtime']['device']}, {report['runtime']['seconds']:.1f} s.",
        "",
        "## Metrics (all depths)",
        "",
        "| metric | value |",
        "|---|---|",
        *[f"| {name} | {_fmt(value)} |" for name, value in report["metrics"].items()],
        "",
    ]
    if report["caveats"]:
        lines += ["Read with care:", ""] + [f"- {note}" for note in report["caveats"].values()] + [""]
    if report["skipped_metrics"]:
        lines += ["Not computed:", ""] + [f"- {reason}" for reason in report["skipped_metrics"].values()] + [""]
    for branch in ("pixel", "semantic"):
        rows = report["rate_distortion"][branch]
        if len(rows) > 1:
            lines += [f"## Rate-distortion ({branch}: first k of Q depths)", "", *_table(rows)]
    if "codebooks" in report:
        lines += ["## Codebook usage", ""]
        rows = [
            {"vocabulary": branch, "depth": entry["depth"], **{k: v for k, v in entry.items() if k != "depth"}}
            for branch, book in report["codebooks"].items()
            for entry in book["per_depth"] + [{"depth": "all", **book["all_depths"]}]
        ]
        lines += _table(rows)
    if "stability" in report:
        lines += ["## Token stability (encode -> decode -> encode)", ""]
        rows = [{"vocabulary": b, **entry} for b, entries in report["stability"].items() for entry in entries]
        lines += _table(rows)
    if report["classifier"]:
        lines += ["## Classifier", "", *[f"- {k}: {v}" for k, v in report["classifier"].items()], ""]
    lines += ["## Protocol", ""]
    for section, content in report["protocol"].items():
        if isinstance(content, dict):
            lines += [f"- **{section}**"] + [f"  - {k}: {v}" for k, v in content.items()]
        else:
            lines += [f"- **{section}**: {content}"]
    lines += ["", "## Versions", "", *[f"- {k}: {v}" for k, v in report["versions"].items()], ""]
    if report["tables"]:
        lines += ["## Tables", ""] + [f"- {name}: [{file}]({file})" for name, file in report["tables"].items()] + [""]
    if report["figures"]:
        lines += ["## Figures", ""] + [f"![{name}]({file})" for name, file in report["figures"].items()] + [""]
    if data["skipped_images"]:
        lines += ["## Unreadable images (skipped)", ""]
        lines += [f"- {item['id']}: {item['reason']}" for item in data["skipped_images"]] + [""]
    return "\n".join(lines)


def write_per_image_csv(rows: list[dict], path: Path) -> Path:
    """The per-image table (image, psnr, ssim, psnr@1..psnr@Q) as CSV, one row per image in data order."""
    columns = list(dict.fromkeys(name for row in rows for name in row))
    lines = [",".join(columns)]
    for row in rows:
        cells = [row.get(name, "") for name in columns]
        lines.append(",".join(_csv_cell(cell) for cell in cells))
    _atomic_write(path, "\n".join(lines) + "\n")
    return path


def _csv_cell(value) -> str:
    if isinstance(value, float):
        return f"{value:.4f}" if math.isfinite(value) else str(value)
    text = str(value)
    return '"' + text.replace('"', '""') + '"' if any(c in text for c in ',"\n') else text


def write_report(report: dict, out_dir: str | Path) -> tuple[Path, Path]:
    """Write report.json and report.md into ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out_dir / "report.json", out_dir / "report.md"
    _atomic_write(json_path, json.dumps(report, indent=2) + "\n")
    _atomic_write(md_path, render_markdown(report))
    return json_path, md_path
