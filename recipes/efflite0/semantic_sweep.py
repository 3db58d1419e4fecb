"""The semantic-vocabulary capacity sweep of docs/RESULTS.md, on the fast path (``branch: "semantic"``).

Every variant is recipes/efflite0/semantic.json with a few overrides and the same short budget, its pixel side taken
from the shipped dualtoken-efflite0 (so the sweep needs no earlier run); all of them read one feature cache, so the tower runs once for the whole sweep. Per variant the table gives bits per position, held-out
top-1 / top-5 through the quantized path, token cosine to the teacher at every depth, code usage per depth and the
time of its training loop (from the ``samples_per_s`` of its metrics.jsonl, so a resumed variant counts every process
that trained it).

    python recipes/efflite0/semantic_sweep.py --steps 400 --out runs/semantic-sweep   (from the repository root)
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from dualtoken.training import load_train_config, train

RECIPE = Path(__file__).with_name("semantic.json")


def quantizer(size: int, dim: int, depth: int) -> list[str]:
    return [
        f"semantic_quantizer.codebook_size={size}",
        f"semantic_quantizer.code_dim={dim}",
        f"semantic_quantizer.depth={depth}",
    ]


TOKENS_ONLY = ["loss.pooled_kl=0.0"]
TAIL_TRAINED = ["freeze.tail=false"]
TAIL_GENTLE = ["freeze.tail=false", "freeze.tail_lr_scale=0.1"]
# name -> (model overrides, config overrides)
VARIANTS: dict[str, tuple[list[str], list[str]]] = {
    "K1024 D16 Q4, tokens": (quantizer(1024, 16, 4), TOKENS_ONLY),
    "K4096 D16 Q8, tokens": (quantizer(4096, 16, 8), TOKENS_ONLY),
    "K4096 D56 Q8, tokens": (quantizer(4096, 56, 8), TOKENS_ONLY),
    "K4096 D112 Q8, tokens": (quantizer(4096, 112, 8), TOKENS_ONLY),
    "K4096 D112 Q8, tokens + pooled MSE": (
        quantizer(4096, 112, 8), ["loss.pooled_kl=0.0", "loss.pooled_mse=0.1", "loss.pooled_cosine=1.0"]
    ),
    "K4096 D112 Q8, tokens + pooled KL": (quantizer(4096, 112, 8), []),
    "K4096 D112 Q8, tokens + 10 x pooled KL": (quantizer(4096, 112, 8), ["loss.pooled_kl=10.0"]),
    "K4096 D112 Q8, tokens + pooled KL, tail trained": (quantizer(4096, 112, 8), TAIL_TRAINED),
    "K4096 D112 Q8, tokens + pooled KL, tail trained at 0.1 x lr": (quantizer(4096, 112, 8), TAIL_GENTLE),
    "K4096 D112 Q4, tokens + pooled KL": (quantizer(4096, 112, 4), []),
    "K16384 D112 Q8, tokens + pooled KL": (quantizer(16384, 112, 8), []),
}


def run_variant(name: str, steps: int, out: Path, extra: list[str]) -> dict:
    model_overrides, overrides = VARIANTS[name]
    folder = out / name.replace(", ", "_").replace(" ", "-").replace("+", "plus")
    base = load_train_config(RECIPE)
    config = load_train_config(
        RECIPE,
        [
            f"output_dir={folder}",
            f"max_steps={steps}",
            f"model_overrides={json.dumps(base.model_overrides + model_overrides)}",
            "init_from=dualtoken-efflite0",  # only the pixel side comes from it, which the sweep does not score
            "log.eval_every=0",
            "log.progress=false",
            *overrides,
            *extra,
        ],
    )
    result_file = folder / "semantic_eval.json"
    if not result_file.is_file():
        train(config)  # resumes an interrupted variant
    results = json.loads(result_file.read_text())
    records = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    train_records = [r for r in records if r["kind"] == "train"]
    samples_per_step = config.data.batch_size * config.grad_accum
    # each record covers the steps since the one before at its samples_per_s (a resumed variant's records continue)
    steps = [r["step"] - before for r, before in zip(train_records, [0] + [r["step"] for r in train_records])]
    seconds = [count * samples_per_step / r["samples_per_s"] for count, r in zip(steps, train_records)]
    semantic = json.loads((folder / "final" / "config.json").read_text())["semantic_quantizer"]
    size, depth = semantic["codebook_size"], semantic["depth"]
    return {
        "name": name,
        "bits": depth * math.log2(size),
        "depth": depth,
        "wall": sum(seconds),  # the training loop's own clock: no cache loading, no evaluation
        **results,
    }


def table(rows: list[dict]) -> str:
    lines = [
        "| variant | bits / position | held-out top-1 / top-5 | token cosine per depth | code usage per depth | training |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        depths = range(1, row["depth"] + 1)
        cosine = " / ".join(f"{row[f'token_cosine@{k}']:.3f}" for k in depths)
        usage = " / ".join(f"{100 * row[f'semantic/depth{k - 1}/usage']:.0f}" for k in depths)
        depth = row["depth"]
        top = f"{100 * row[f'top1@{depth}']:.1f} / {100 * row[f'top5@{depth}']:.1f} %"
        lines.append(f"| {row['name']} | {row['bits']:.0f} | {top} | {cosine} | {usage} % | {row['wall']:.0f} s |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=400, help="training steps per variant (default: %(default)s)")
    parser.add_argument("--out", default="runs/semantic-sweep", help="output folder (default: %(default)s)")
    parser.add_argument("--only", nargs="*", default=None, help="run only these variants (names as in the table)")
    parser.add_argument("--set", action="append", default=[], help="an extra override for every variant")
    args = parser.parse_args()
    out = Path(args.out)
    rows = [run_variant(name, args.steps, out, args.set) for name in (args.only or VARIANTS)]
    text = table(rows)
    (out / "table.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
