"""One tokenizer or a pair? DualToken against a naive pair of tokenizers inside the same small MLLM, on CIFAR-10.

The paper's claim (its MJHQ FID 7.88 against 17.55 for a MoVQGAN + VQ-SigLIP dual-encoder baseline): one tokenizer
with two vocabularies serves an MLLM better than two tokenizers trained apart. Here, at the scale of this CPU:

  dualtoken  DualToken's two vocabularies from one tokenizer: the equal-bits ablation's run (d)
             (recipes/efflite0/ablation.py), pixel codes at the shallow tap, semantic codes at the deep tap
  pair       a naive pair (dualtoken.TokenizerPair): pixel codes of a reconstruction-only tokenizer, semantic codes
             of a separately trained semantic-only tokenizer, each with its own tower and codebook training and
             the same codebook shapes as (d)'s vocabularies, so both arms spend the same bits per position
  semantic   DualToken's semantic vocabulary alone (the MLLM reads one vocabulary; understanding only)
  pixel      DualToken's pixel vocabulary alone

All tokenizers train with the ablation's recipe, data, schedule (160 steps of 8 crops) and seed, and are read at the
same export step (100).
Every arm then runs the CIFAR-10 recipe's own stages (run.py: prepare, train, evaluate; the same language model,
data, steps and seed; 2 seeds for dualtoken and pair). Scores, each with a 95 % bootstrap interval over images:
answer accuracy on the test images; for generation, the requested-class rate judged by one classifier for every
arm (logistic regression on EfficientNet-Lite0 features of the real training images, so no arm judges itself) and
the Fréchet distance on the same features against the real test images; tokens per image and encode time per image.

    OMP_NUM_THREADS=2 python recipes/mllm_cifar/pair_study.py all --out runs/pair_study

Stages (each resumable; ``all`` runs them in order): ``tokenizers`` ((d) and the two pair members), ``arms`` (the MLLM runs), ``score`` (the table: ``<out>/pair_study.md`` and ``.json``).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import sys
import time
import warnings
from pathlib import Path

import torch

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
import run as recipe  # noqa: E402  (the CIFAR recipe's stages)
from timing import timed  # noqa: E402  (the recipe's timer)

from dualtoken import TokenizerPair  # noqa: E402
from dualtoken.errors import ConfigError, DataError, DualTokenError  # noqa: E402
from dualtoken.training import train  # noqa: E402


def _ablation_module():
    """recipes/efflite0/ablation.py: its recipe handling and training of one run."""
    spec = importlib.util.spec_from_file_location("ablation", HERE.parent / "efflite0" / "ablation.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses resolve their annotations through sys.modules
    spec.loader.exec_module(module)
    return module


ablation = _ablation_module()

PAIR_MEMBERS = ("p_pixel_only", "s_semantic_only")
DUALTOKEN_RUN = "d_dualtoken"


def member_overrides(model) -> dict[str, list[str]]:
    """The pair's two tokenizers as overrides of the ablation's recipe: one codebook each (no ``pixel_quantizer``),
    with the shape of DualToken's vocabulary of that side, trained for that side's objective only."""
    single = ["model:pixel_quantizer=null", "model:shortcut_layer=null"]
    pixel = model.pixel_quantizer
    return {
        "p_pixel_only": [
            *single,
            f"model:semantic_layer={model.pixel_layer}",
            f"model:semantic_quantizer.depth={pixel.depth}",
            f"model:semantic_quantizer.codebook_size={pixel.codebook_size}",
            f"model:semantic_quantizer.code_dim={pixel.code_dim}",
            "loss.semantic_weight=0",
            "teacher=none",
        ],
        "s_semantic_only": [
            *single,
            f"model:pixel_layer={model.semantic_layer}",
            "loss.pixel_mse=0",
            "loss.pixel_l1=0",
            "loss.perceptual=0",
        ],
    }


def train_tokenizers(args: argparse.Namespace) -> None:
    """DualToken (the ablation's (d)) and the pair's two members, with the ablation's recipe and settings, each
    trained to export step ``--step`` of its ``--steps`` schedule (a run cut short resumes from its checkpoint)."""
    base = ablation.load_train_config(
        args.recipe, [*args.set, f"max_steps={args.steps}", f"checkpoint.export_every={args.export_every}"]
    )
    if args.step % args.export_every or args.step > args.steps:
        raise ConfigError(f"--step {args.step} must be a multiple of --export-every within --steps {args.steps}")
    model = ablation.recipe_model(base)
    runs = {DUALTOKEN_RUN: ablation.variants(model)[DUALTOKEN_RUN], **member_overrides(model)}
    for name, overrides in runs.items():
        if export(args, name).is_dir():
            continue
        config = ablation.variant_config(base, [*overrides, f"output_dir={export(args, name).parent}"])
        started = time.perf_counter()
        summary = train(config, stop_at=args.step)
        print(f"{name}: step {summary['step']} in {time.perf_counter() - started:.0f} s")


def export(args: argparse.Namespace, run: str) -> Path:
    return Path(args.out) / "tokenizers" / run / f"export-{args.step:08d}"


# ----------------------------------------------------------------------------------------------------------------
# arms: the CIFAR recipe's stages per arm and seed
# ----------------------------------------------------------------------------------------------------------------


def arm_tokenizers(args: argparse.Namespace) -> dict[str, Path]:
    """{arm: the tokenizer folder its MLLM reads}; the pair is written once as a TokenizerPair folder."""
    for run in (DUALTOKEN_RUN, *PAIR_MEMBERS):
        if not export(args, run).is_dir():
            raise DataError(f"no tokenizer {export(args, run)}: run the tokenizers stage first")
    pair = Path(args.out) / "tokenizers" / "pair"
    if not (pair / "pair.json").is_file():
        TokenizerPair.from_parts(*(export(args, run) for run in PAIR_MEMBERS), name="pair").save_pretrained(pair)
    return {"dualtoken": export(args, DUALTOKEN_RUN), "pair": pair}


def arm_plan(args: argparse.Namespace) -> list[dict]:
    """Every MLLM run: DualToken and the pair at each seed; DualToken's seed-0 run also trains one MLLM per single
    vocabulary (the recipe's modes "semantic" and "pixel")."""
    plan = []
    for arm in ("dualtoken", "pair"):
        for seed in args.seeds:
            modes = ["both", "semantic", "pixel"] if arm == "dualtoken" and seed == args.seeds[0] else ["both"]
            plan.append({"arm": arm, "seed": seed, "modes": modes, "work": Path(args.out) / "arms" / arm / f"seed{seed}"})
    return plan


def arm_config(args: argparse.Namespace, tokenizer: Path, run: dict) -> recipe.RecipeConfig:
    modes = json.dumps(run["modes"])
    return recipe.load_recipe(args.mllm_recipe, [
        f"tokenizer={tokenizer.resolve()}", f"work={run['work']}", f"seed={run['seed']}", f"modes={modes}",
        f"generation_modes={modes}", *args.mllm_set,
    ])


def share_prepared(first: Path, work: Path) -> None:
    """A later seed reads the first seed's prepared images, tokens and text tokenizer (links, not copies)."""
    work.mkdir(parents=True, exist_ok=True)
    for name in ("images", "tokens", "text_tokenizer", "conversations.json", "captions.jsonl", "tokenizer"):
        if (first / name).exists() and not (work / name).exists():
            (work / name).symlink_to((first / name).resolve())


def run_arms(args: argparse.Namespace) -> None:
    tokenizers = arm_tokenizers(args)
    first_work: dict[str, Path] = {}
    for run in arm_plan(args):
        cfg = arm_config(args, tokenizers[run["arm"]], run)
        work = Path(cfg.work)
        if (work / "per_image.pt").is_file():
            continue
        if run["arm"] in first_work:
            share_prepared(first_work[run["arm"]], work)
        first_work.setdefault(run["arm"], work)
        started = time.perf_counter()
        for stage in (recipe.prepare, recipe.train, recipe.evaluate):
            stage(cfg)
        print(f"{run['arm']} seed {run['seed']}: {time.perf_counter() - started:.0f} s")


# ----------------------------------------------------------------------------------------------------------------
# score
# ----------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def encode_seconds(tokenizer, images: torch.Tensor, repeats: int = 3) -> float:
    """Median seconds per image of ``tokenizer.encode`` on ``images`` (after one warm-up call)."""
    tokenizer.encode(images)
    times = sorted(timed(lambda: tokenizer.encode(images)) for _ in range(repeats))
    return times[len(times) // 2] / len(images)


def frechet_bootstrap(real: torch.Tensor, drawn: torch.Tensor, resamples: int, seed: int = 0) -> dict[str, float]:
    """Fréchet distance with a 95 % bias-corrected bootstrap interval (real and drawn images resampled together).

    Resampling with replacement repeats images, which moves the distance up: the resampled distances sit above the
    full-sample one, and their plain percentile interval need not contain it. The interval given is that percentile
    interval shifted down by the bootstrap's bias (mean of the resampled distances - the full-sample distance)."""
    generator = torch.Generator().manual_seed(seed)
    values = []
    for _ in range(resamples):
        r = real[torch.randint(len(real), (len(real),), generator=generator)]
        d = drawn[torch.randint(len(drawn), (len(drawn),), generator=generator)]
        values.append(recipe.frechet_distance(r, d))
    quantiles = torch.tensor([0.025, 0.975], dtype=torch.float64)
    values = torch.tensor(values, dtype=torch.float64)
    low, high = torch.quantile(values, quantiles).tolist()
    full = recipe.frechet_distance(real, drawn)
    bias = float(values.mean()) - full
    return {"mean": full, "low": low - bias, "high": high - bias, "bias": bias, "n": len(drawn)}


def score(args: argparse.Namespace) -> dict:
    from dualtoken import load_visual_tokenizer

    tokenizers, plan = arm_tokenizers(args), arm_plan(args)
    configs = [arm_config(args, tokenizers[run["arm"]], run) for run in plan]
    loaded = {arm: load_visual_tokenizer(folder) for arm, folder in tokenizers.items()}
    size = loaded["dualtoken"].image_size
    referee = recipe.judge(Path(configs[0].work), configs[0], size)
    rows, hits_of, judge_hits, per_run = [], {}, None, {}
    for run, cfg in zip(plan, configs, strict=True):
        per_image = per_run[(run["arm"], run["seed"])] = torch.load(Path(cfg.work) / "per_image.pt", weights_only=False)
        if judge_hits is None:  # how well the judge names real test images: the ceiling of a drawn image's score
            judge_hits = (referee.predict(per_image["real_test_features"]) == per_image["test_labels"]).float()
        for mode in run["modes"]:
            row = {"arm": run["arm"], "seed": run["seed"], "mode": mode,
                   "answers": ablation.bootstrap(per_image["understanding"][mode].float(), args.bootstrap)}
            key = "cfg_3" if mode == "both" else f"{mode}_cfg_3"
            drawn = per_image["generation"].get(key)
            if drawn is not None:
                hits = (referee.predict(drawn["features"]) == drawn["requested"]).float()
                hits_of[(run["arm"], run["seed"], mode)] = hits
                row["requested_class"] = ablation.bootstrap(hits, args.bootstrap)
                row["frechet"] = frechet_bootstrap(per_image["real_test_features"], drawn["features"], args.fd_bootstrap)
            rows.append(row)
    # the same images through each arm's tokenizer, side by side: tokens per image and encode time
    first = Path(configs[0].work) / "images" / "test"
    images = torch.stack([recipe.load_image(p, size) for p in sorted(first.glob("*.png"))[:64]])
    costs = {}
    for arm, tokenizer in loaded.items():
        h, w = tokenizer.grid
        costs[arm] = {"positions": h * w, "codes_per_position": tokenizer.pixel_depth + tokenizer.semantic_depth,
                      "bits_per_position": round(sum(
                          depth * math.log2(tokenizer.codebook_size(b)) for b, depth in
                          (("pixel", tokenizer.pixel_depth), ("semantic", tokenizer.semantic_depth)))),
                      "encode_ms_per_image": 1e3 * encode_seconds(tokenizer, images)}
    differences = arm_differences(per_run, hits_of, args)
    result = {"rows": rows, "costs": costs, "differences": differences, "threads": torch.get_num_threads(),
              "judge_on_real_test_images": ablation.bootstrap(judge_hits, args.bootstrap)}
    out = Path(args.out)
    (out / "pair_study.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "pair_study.md").write_text(render(result))
    print(render(result))
    return result


def arm_differences(per_run: dict, hits_of: dict, args: argparse.Namespace) -> list[dict]:
    """DualToken - pair per seed: answers paired over the same test images; the drawn images' requested-class rate
    as the difference of two independent bootstrap means (each arm draws its own images). ``per_run``: each run's
    per-image results by (arm, seed); ``hits_of``: the judge's hits on each run's drawn images by (arm, seed, mode)."""
    out = []
    for seed in args.seeds:
        ours, theirs = per_run[("dualtoken", seed)], per_run[("pair", seed)]
        delta = ours["understanding"]["both"].float() - theirs["understanding"]["both"].float()
        entry = ablation.bootstrap(delta, args.bootstrap)
        out.append({"seed": seed, "axis": "answer accuracy", **entry, "verdict": ablation.verdict(entry)})
        ours, theirs = hits_of.get(("dualtoken", seed, "both")), hits_of.get(("pair", seed, "both"))
        if ours is not None and theirs is not None:
            entry = independent_difference(ours, theirs, args.bootstrap)
            out.append({"seed": seed, "axis": "requested class", **entry, "verdict": ablation.verdict(entry)})
    return out


def independent_difference(a: torch.Tensor, b: torch.Tensor, resamples: int, seed: int = 0) -> dict[str, float]:
    """mean(a) - mean(b) with a 95 % percentile interval, ``a`` and ``b`` resampled apart (different images)."""
    generator = torch.Generator().manual_seed(seed)
    means = [v.double()[torch.randint(len(v), (resamples, len(v)), generator=generator)].mean(1) for v in (a, b)]
    low, high = torch.quantile(means[0] - means[1], torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
    return {"mean": float(a.double().mean() - b.double().mean()), "low": low, "high": high, "n": len(a)}


def _cell(entry: dict | None, scale: float = 100.0, digits: int = 1) -> str:
    """"mean [low, high]" as the ablation's tables write it; "-" where there is nothing (no drawn images)."""
    return "-" if entry is None else ablation._cell(entry, scale, digits)


def render(result: dict) -> str:
    labels = {"both": "semantic + pixel", "semantic": "semantic only", "pixel": "pixel only"}
    lines = [
        "| arm | MLLM seed | input | answer accuracy % | requested class % (drawn, guidance 3) | Fréchet distance |",
        "|---|---|---|---|---|---|",
    ]
    for row in result["rows"]:
        lines.append(f"| {row['arm']} | {row['seed']} | {labels[row['mode']]} | {_cell(row['answers'])} | "
                     f"{_cell(row.get('requested_class'))} | {_cell(row.get('frechet'), 1.0, 1)} |")
    lines += ["", "| difference (DualToken - pair) | seed | mean [95 %] | verdict |", "|---|---|---|---|"]
    for d in result["differences"]:
        lines.append(f"| {d['axis']} (points) | {d['seed']} | {_cell(d)} | {d['verdict']} |")
    lines += ["", "| tokenizer | positions per image | codes per position | bits per position | encode ms per image |",
              "|---|---|---|---|---|"]
    for arm, cost in result["costs"].items():
        lines.append(f"| {arm} | {cost['positions']} | {cost['codes_per_position']} | {cost['bits_per_position']} | "
                     f"{cost['encode_ms_per_image']:.1f} |")
    lines += ["", f"The judge names the class of {_cell(result['judge_on_real_test_images'])} % of the real test "
              "images (chance 10 %)."]
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("stage", choices=("tokenizers", "arms", "score", "all"))
    parser.add_argument("--out", default="runs/pair_study")
    parser.add_argument("--step", type=int, default=100, help="the export step every tokenizer is read at")
    # the tokenizers' training: the ablation's settings (docs/RESULTS.md, "The paper's central ablation")
    parser.add_argument("--recipe", default=str(HERE.parent / "efflite0" / "cpu.json"))
    parser.add_argument("--steps", type=int, default=160)
    parser.add_argument("--export-every", type=int, default=20)
    parser.add_argument("--set", action="append", default=[
        "data.batch_size=8", "optimizer.warmup_steps=20", "checkpoint.every=20", "log.codebook_every=20",
        "log.every=5", "log.progress=false"], help="key=value on the tokenizers' recipe")
    # the MLLM runs: the quick recipe at a size that can tell the arms apart
    parser.add_argument("--mllm-recipe", default=str(HERE / "quick.json"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="MLLM seeds of the two main arms")
    parser.add_argument("--mllm-set", action="append", default=[
        "train_limit=2000", "test_limit=500", "steps=320", "samples_per_class=20", "guidance_scales=[3.0]",
        "image_size=null"], help="key=value on the MLLM recipe")
    parser.add_argument("--bootstrap", type=int, default=2000, help="bootstrap resamples of rates")
    parser.add_argument("--fd-bootstrap", type=int, default=100, help="bootstrap resamples of a Fréchet distance")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    warnings.filterwarnings("ignore", category=recipe.UpscaledImageWarning)  # CIFAR's 32 px, enlarged on purpose
    try:
        if args.stage in ("tokenizers", "all"):
            train_tokenizers(args)
        if args.stage in ("arms", "all"):
            run_arms(args)
        if args.stage in ("score", "all"):
            score(args)
    except DualTokenError as error:
        print(f"pair_study: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
