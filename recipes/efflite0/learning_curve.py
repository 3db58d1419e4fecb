"""Learning curves of training runs: a held-out metric against training images seen, as a table and a PNG.

Reads the ``eval`` records of each run's ``metrics.jsonl`` (``samples_seen`` and, by default, Kodak ``psnr``),
prints a markdown table (one row per evaluation) and draws one line per run. ``--target`` extrapolates each
run: a straight line through its later points (the last half, images seen > 0) against log10(images seen), and the
images seen at which that line reaches the target. A log-linear trend is what these curves show once past their
first fast rise; a curve that flattens faster than that (a model at its capacity) will need more, so read the
figure as a lower bound.

A run that started from another's export (``init_from``) continues its curve: ``label=first+second`` joins them,
the second's steps and images seen counted on from the first's last evaluation (whose figure the second's start
repeats, so that record is dropped).

    python recipes/efflite0/learning_curve.py runs/efflite0-pixel-cpu --out docs/images/efflite0_pixel_cpu_learning_curve.png \
        --y-label "Kodak-24 PSNR at 256 px (dB)"
    python recipes/efflite0/learning_curve.py "cpu=runs/a" "device=runs/b" --metric psnr --out curve.png
    python recipes/efflite0/learning_curve.py runs/efflite0-pixel-stable --target 24
    python recipes/efflite0/learning_curve.py "shipped=runs/stable-w0+runs/cont-w0" --target 24
"""

from __future__ import annotations

import argparse
import json
import math
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


def chained_points(folders: list[Path], metric: str) -> list[tuple[int, int, float]]:
    """The eval points of runs that each started from the one before's export, as one run: each later run's steps
    and images seen offset by the previous run's last evaluation, its own start (step 0) dropped."""
    points: list[tuple[int, int, float]] = []
    for folder in folders:
        step0, seen0 = points[-1][:2] if points else (0, 0)
        points += [
            (step0 + step, seen0 + seen, value) for step, seen, value in eval_points(folder, metric)
            if not (points and step == 0)
        ]
    return points


def table(curves: dict[str, list[tuple[int, int, float]]], metric: str) -> str:
    lines = [f"| run | step | images seen | {metric} |", "|---|---|---|---|"]
    for label, points in curves.items():
        lines += [f"| {label} | {step} | {seen:,} | {value:.2f} |" for step, seen, value in points]
    return "\n".join(lines)


def log_linear_trend(points: list[tuple[int, int, float]]) -> tuple[float, float]:
    """``(intercept, slope)`` of a least-squares line of the metric against log10(images seen), through the last
    half of the points that have seen images (at least two)."""
    seen = [(math.log10(n), value) for _, n, value in points if n > 0]
    later = seen[len(seen) // 2 :] if len(seen) >= 4 else seen
    if len(later) < 2:
        raise SystemExit("--target needs at least two evaluations after the start of a run")
    mean_x = sum(x for x, _ in later) / len(later)
    mean_y = sum(y for _, y in later) / len(later)
    spread = sum((x - mean_x) ** 2 for x, _ in later)
    slope = sum((x - mean_x) * (y - mean_y) for x, y in later) / spread
    return mean_y - slope * mean_x, slope


def extrapolation(label: str, points: list[tuple[int, int, float]], target: float) -> str:
    """One line: the trend per tenfold of images and the images seen at which it reaches ``target``."""
    intercept, slope = log_linear_trend(points)
    line = f"{label}: {slope:+.2f} per tenfold images seen (fit through the later points)"
    if slope <= 0:
        return line + f"; the trend does not rise, so it never reaches {target:g}"
    needed = 10 ** ((target - intercept) / slope)
    return line + f"; reaches {target:g} at about {needed:,.3g} images seen ({needed / points[-1][1]:,.3g}x this run)"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "runs", nargs="+", help="training output folders, optionally as label=folder; folder+folder continues a run"
    )
    parser.add_argument("--metric", default="psnr", help="the eval record's field to plot (default: %(default)s)")
    parser.add_argument("--out", default=None, help="write the figure to this PNG")
    parser.add_argument("--y-label", default=None, help="the figure's y axis (default: the metric's name)")
    parser.add_argument("--target", type=float, default=None, help="extrapolate each run to this metric value")
    args = parser.parse_args(argv)
    curves = {}
    for spec in args.runs:
        label, _, folder = spec.rpartition("=") if "=" in spec else (Path(spec).name, "", spec)
        curves[label] = chained_points([Path(part) for part in folder.split("+")], args.metric)
    print(table(curves, args.metric))
    if args.target is not None:
        for label, points in curves.items():
            print(extrapolation(label, points, args.target))
    if args.out:
        points = {label: [(seen, value) for _, seen, value in rows] for label, rows in curves.items()}
        learning_curve_figure(points, "training images seen", args.y_label or args.metric, Path(args.out))
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
