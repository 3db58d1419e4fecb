"""Learning curves of training runs: a held-out metric against training images seen, as a table and a PNG.

Reads the ``eval`` records of each run's ``metrics.jsonl`` (``samples_seen`` and, by default, Kodak ``psnr``),
prints a markdown table (one row per evaluation) and draws one line per run.

    python recipes/efflite0/learning_curve.py runs/efflite0-pixel-cpu --out docs/images/efflite0_pixel_cpu_learning_curve.png \
        --y-label "Kodak-24 PSNR at 256 px (dB)"
    python recipes/efflite0/learning_curve.py "cpu=runs/a" "device=runs/b" --metric psnr --out curve.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from dualtoken.evaluation.figures import learning_curve_figure


def eval_points(run: Path, metric: str) -> list[tuple[int, int, float]]:
    """``(step, samples_seen, metric)`` of every eval record of ``run``/metrics.jsonl that has both."""
    path = run / "metrics.jsonl"
    if not path.is_file():
        raise SystemExit(f"{run}: no metrics.jsonl (expected the output_dir of a training run)")
    points = {}
    for line in path.read_text().splitlines():
        record = json.loads(line)
        if record.get("kind") == "eval" and metric in record and "samples_seen" in record:
            points[record["step"]] = (record["step"], record["samples_seen"], record[metric])  # a resumed run wins
    return [points[step] for step in sorted(points)]


def table(curves: dict[str, list[tuple[int, int, float]]], metric: str) -> str:
    lines = [f"| run | step | images seen | {metric} |", "|---|---|---|---|"]
    for label, points in curves.items():
        lines += [f"| {label} | {step} | {seen:,} | {value:.2f} |" for step, seen, value in points]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="training output folders, optionally as label=folder")
    parser.add_argument("--metric", default="psnr", help="the eval record's field to plot (default: %(default)s)")
    parser.add_argument("--out", default=None, help="write the figure to this PNG")
    parser.add_argument("--y-label", default=None, help="the figure's y axis (default: the metric's name)")
    args = parser.parse_args(argv)
    curves = {}
    for spec in args.runs:
        label, _, folder = spec.rpartition("=") if "=" in spec else (Path(spec).name, "", spec)
        curves[label] = eval_points(Path(folder), args.metric)
    print(table(curves, args.metric))
    if args.out:
        points = {label: [(seen, value) for _, seen, value in rows] for label, rows in curves.items()}
        learning_curve_figure(points, "training images seen", args.y_label or args.metric, Path(args.out))
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
