"""The paper's ablation at equal bits, as one command: train four tokenizers with the same recipe, data, steps and
wall-clock budget, score each at the largest export step all of them reached, and write markdown tables and a
figure (Kodak PSNR against held-out top-1, ``ablation.png``).

  (a) one codebook at the deep tap, both losses, as many bits per position as DualToken's two vocabularies
  (b) one codebook at the deep tap, reconstruction only (same bits as (a))
  (c) one codebook at the shallow tap, reconstruction only (same bits as (a))
  (d) DualToken: the pixel vocabulary at the shallow tap, the semantic one at the deep tap

The single codebook keeps the semantic vocabulary's K and takes the depth that spends DualToken's bits. ``--seeds
a=0,1 d=0,1`` trains more seeds of a variant (a run ``<variant>_seed<s>`` for every seed but the recipe's).

Scores, each a mean over images with a 95 % percentile bootstrap interval: Kodak PSNR / SSIM of the full-depth
reconstruction; on the held-out images, top-1 / top-5 of the pooled output through the quantized semantic path (a
backbone whose pooled output is ImageNet logits) and the token cosine between the quantized semantic features and
the frozen teacher's at the semantic tap; the share of the K codes used at each depth. Differences (d) - (a),
(d) - (b), (d) - (c) come with paired bootstrap intervals: the same resampled images for both runs.

Runs train one after the other; an interrupted command resumes: a finished run is not trained again (a run cut
short continues from its last checkpoint), a scored run is not scored again. Bad input (a recipe whose bits do not
make whole depths of the single codebook, an unknown variant, a missing data path) is one line and exit code 2,
before anything trains.

usage (docs/RESULTS.md ran this without --seeds; docs/TRAINING.md explains the options):
  OMP_NUM_THREADS=1 python recipes/efflite0/ablation.py --out runs/ablation --steps 160 --budget-seconds 600 \
      --export-every 20 --eval-size 256 --seeds a=0,1 d=0,1 --set data.batch_size=8 --set optimizer.warmup_steps=20 \
      --set checkpoint.every=20 --set log.codebook_every=20 --set log.every=5 --set log.progress=false
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from dualtoken import DualTokenizer, get_config
from dualtoken.config import TokenizerConfig, apply_overrides
from dualtoken.data import open_image_source
from dualtoken.errors import ConfigError, DataError, DualTokenError
from dualtoken.evaluation.codebook_stats import code_histogram
from dualtoken.evaluation.samples import labels_from_tsv
from dualtoken.evaluation.semantic import token_cosine
from dualtoken.metrics import bootstrap_mean, psnr, ssim
from dualtoken.tokenizer import DualTokens
from dualtoken.training import TrainConfig, load_train_config, train
from dualtoken.training.tap_cache import states_below_tap

HERE = Path(__file__).parent
IMAGENET_CLASSES = 1000
TOP_K = 5
SCORE_BATCH = 16
COMPARED = ("a", "b", "c")  # (d) - (x) for each of these
COLORS = {"a": "tab:orange", "b": "tab:green", "c": "tab:purple", "d": "tab:blue"}


def bits_per_position(config: TokenizerConfig) -> int:
    """Bits one grid position spends: sum over vocabularies of depth x log2(K)."""
    quantizers = [q for q in (config.pixel_quantizer, config.semantic_quantizer) if q is not None]
    return round(sum(q.depth * math.log2(q.codebook_size) for q in quantizers))


def variants(model: TokenizerConfig) -> dict[str, list[str]]:
    """Each variant's overrides on the recipe (``model_overrides`` entries prefixed with ``model:``)."""
    semantic = model.semantic_quantizer
    depth = bits_per_position(model) / math.log2(semantic.codebook_size)
    if depth != int(depth):
        raise ConfigError(
            f"{bits_per_position(model)} bits per position do not make whole depths of K={semantic.codebook_size}"
        )
    single = ["model:pixel_quantizer=null", "model:shortcut_layer=null", f"model:semantic_quantizer.depth={int(depth)}"]
    recon = ["loss.semantic_weight=0"]  # the teacher stays (unused by the loss), so every run reads one tap cache
    return {
        "a_single_deep_both": [*single, f"model:pixel_layer={model.semantic_layer}"],
        "b_single_deep_recon": [*single, f"model:pixel_layer={model.semantic_layer}", *recon],
        "c_single_shallow_recon": [*single, f"model:semantic_layer={model.pixel_layer}", *recon],
        "d_dualtoken": [],
    }


def parse_seeds(specs: list[str], default: int) -> dict[str, list[int]]:
    """``["a=0,1", "d=0,1"]`` -> {variant letter: seeds}; every variant not named trains the recipe's seed only."""
    seeds = {letter: [default] for letter in "abcd"}
    for spec in specs:
        letter, _, values = spec.partition("=")
        if letter not in seeds:
            raise ConfigError(f"unknown variant {letter!r} in --seeds {spec!r} (variants: a, b, c, d)")
        try:
            seeds[letter] = sorted({int(v) for v in values.split(",")})
        except ValueError:
            raise ConfigError(f"--seeds {spec!r}: expected LETTER=SEED[,SEED...]") from None
    return seeds


def plan_runs(model: TokenizerConfig, seeds: dict[str, list[int]], default_seed: int) -> dict[str, dict]:
    """Every run to train: {run name: {"variant", "letter", "seed", "overrides"}} in training order (seed by seed)."""
    runs = {}
    for seed in sorted({s for values in seeds.values() for s in values}, key=lambda s: s != default_seed):
        for variant, overrides in variants(model).items():
            letter = variant[0]
            if seed in seeds[letter]:
                name = variant if seed == default_seed else f"{variant}_seed{seed}"
                runs[name] = {"variant": variant, "letter": letter, "seed": seed,
                              "overrides": [*overrides, f"seed={seed}"]}
    return runs


def variant_config(base: TrainConfig, overrides: list[str]) -> TrainConfig:
    """``base`` with a variant's overrides: ``model:`` entries join its ``model_overrides``, the rest apply as set."""
    model = [o.removeprefix("model:") for o in overrides if o.startswith("model:")]
    rest = [o for o in overrides if not o.startswith("model:")]
    return apply_overrides(dataclasses.replace(base, model_overrides=[*base.model_overrides, *model]), rest)


def recipe_model(config: TrainConfig) -> TokenizerConfig:
    source = Path(config.model)
    model = TokenizerConfig.load(source) if source.suffix == ".json" else get_config(config.model)
    return apply_overrides(model, config.model_overrides)


def common_export_step(folders: list[Path]) -> tuple[int, dict[str, list[int]]]:
    """The largest export step every run folder reached, and each one's export steps."""
    steps = {f.name: sorted(int(e.name.split("-")[1]) for e in f.glob("export-*")) for f in folders}
    missing = [name for name, found in steps.items() if not found]
    if missing:
        raise DataError(f"no export-* folder in {', '.join(missing)}: lower --export-every")
    return min(s[-1] for s in steps.values()), steps


def check_paths(base: TrainConfig, kodak: str, heldout: str) -> None:
    """Every data path opens (DataError otherwise), before anything trains."""
    for spec in (base.data.train, kodak, heldout):
        open_image_source(spec, 8)
    labels_from_tsv(Path(heldout))


# ----------------------------------------------------------------------------------------------------------------
# scores
# ----------------------------------------------------------------------------------------------------------------


bootstrap = bootstrap_mean  # the paired percentile bootstrap of per-image values (dualtoken.metrics)


def verdict(difference: dict | None) -> str:
    """(d) - (x) read from its interval: "shown" above zero, "reversed" below, "not shown" across it."""
    if difference is None:
        return "n/a"
    if difference["low"] > 0:
        return "shown"
    return "reversed" if difference["high"] < 0 else "not shown"


@dataclass
class EvalTaps:
    """The frozen tower's tokens at the ablation's taps for the scored images, computed once for every run and
    export: each variant's tower below its taps is the teacher's (checked per export), so these are the tokens its
    own ``encode`` would compute. Kodak keeps its images (the reconstruction target)."""

    layers: list[int]
    digests: list[str]  # per tower layer 0..max(layers): a digest of its weights and buffers
    kodak_ids: list[str]
    kodak_images: torch.Tensor  # (N, 3, H, W)
    kodak_tokens: dict[int, torch.Tensor]  # layer -> (N, h*w, width)
    heldout_ids: list[str]
    heldout_tokens: dict[int, torch.Tensor]

    def first(self, count: int | None) -> EvalTaps:
        """The same for the first ``count`` images of each set (all: None)."""
        cut = slice(None, count)
        return EvalTaps(self.layers, self.digests, self.kodak_ids[cut], self.kodak_images[cut],
                        {layer: values[cut] for layer, values in self.kodak_tokens.items()}, self.heldout_ids[cut],
                        {layer: values[cut] for layer, values in self.heldout_tokens.items()})

    def check(self, tokenizer: DualTokenizer) -> None:
        """DataError unless the tokenizer's tower up to its deepest tap is the one these tokens came from."""
        deepest = max(tokenizer.tap_layers())
        if deepest > max(self.layers) or tower_digests(tokenizer.backbone, deepest) != self.digests[: deepest + 1]:
            raise DataError(f"the tower of {tokenizer.name_or_path} below its taps is not the one the cached tokens came from")


def tower_digests(tower, last: int) -> list[str]:
    """A digest of each tower layer 0..``last`` (weights and buffers)."""
    digests = []
    for state in states_below_tap(tower, last):
        digest = hashlib.sha256()
        for name in sorted(state):
            digest.update(name.encode())
            digest.update(state[name].float().cpu().numpy().tobytes())
        digests.append(digest.hexdigest()[:16])
    return digests


@torch.no_grad()
def eval_taps(tokenizer: DualTokenizer, layers: list[int], kodak: str, heldout: str, limit: int | None) -> EvalTaps:
    """The tower's tokens at ``layers`` for the first ``limit`` images of each set (all: None), at the tokenizer's
    size; its tower below those layers must be the teacher's (DataError otherwise)."""
    digests = tower_digests(tokenizer.backbone, max(layers))
    if tower_digests(tokenizer.teacher(), max(layers)) != digests:
        raise DataError("the scored tower below its taps is not the frozen teacher's")
    parts = {}
    for name, spec in (("kodak", kodak), ("heldout", heldout)):
        ids, images, tokens = [], [], {layer: [] for layer in layers}
        for batch, batch_ids in _batches(open_image_source(spec, tokenizer.image_size), limit):
            ids += batch_ids
            images.append(batch)
            for layer, values in tokenizer.tap_tokens(batch, layers).items():
                tokens[layer].append(values)
        parts[name] = (ids, torch.cat(images), {layer: torch.cat(values) for layer, values in tokens.items()})
    return EvalTaps(layers, digests, parts["kodak"][0], parts["kodak"][1], parts["kodak"][2], parts["heldout"][0],
                    parts["heldout"][2])


def encode_taps(tokenizer: DualTokenizer, tokens: dict[int, torch.Tensor]) -> DualTokens:
    """What ``tokenizer.encode`` gives for the images whose tap tokens are ``tokens`` (never updates)."""
    taps = tokenizer.taps_from_tokens(tokens)
    semantic = tokenizer.quantizer("semantic")(taps.semantic_latent, update=False).codes
    pixel = semantic if tokenizer.pixel.quantizer is None else tokenizer.pixel.quantizer(taps.pixel_latent, update=False).codes
    return DualTokens(*(codes.view(codes.shape[0], *tokenizer.grid, codes.shape[-1]) for codes in (pixel, semantic)))


@torch.no_grad()
def per_image_scores(tokenizer: DualTokenizer, taps: EvalTaps, heldout: str) -> dict:
    """Per-image Kodak PSNR / SSIM and held-out top-1 / top-5 hits and token cosine (to the frozen teacher's tokens
    at the run's semantic tap, which are the cached tower's), with the image ids, and the share of codes used per
    depth of each vocabulary over the held-out images."""
    tokenizer.eval()
    tokenizer.precision = "fp32"  # decode in float32 on every CPU (the taps are float32's)
    taps.check(tokenizer)
    layers = tokenizer.tap_layers()
    kodak_rows: dict[str, list] = {"id": taps.kodak_ids, "psnr": [], "ssim": []}
    for start in range(0, len(taps.kodak_ids), SCORE_BATCH):
        images = taps.kodak_images[start : start + SCORE_BATCH]
        codes = encode_taps(tokenizer, {layer: taps.kodak_tokens[layer][start : start + SCORE_BATCH] for layer in layers})
        reconstruction = tokenizer.decode(codes.pixel).float()  # (B, 3, H, W)
        kodak_rows["psnr"] += psnr(reconstruction, images).tolist()
        kodak_rows["ssim"] += ssim(reconstruction, images).tolist()

    _, labels = labels_from_tsv(Path(heldout))
    with_head = tokenizer.backbone.pooled_width == IMAGENET_CLASSES
    layer = tokenizer.config.semantic_layer
    heldout_rows: dict[str, list] = {"id": taps.heldout_ids, "top1": [], "top5": [], "token_cosine": []}
    histograms: dict[str, torch.Tensor] = {}
    for start in range(0, len(taps.heldout_ids), SCORE_BATCH):
        ids = taps.heldout_ids[start : start + SCORE_BATCH]
        codes = encode_taps(tokenizer, {tap: taps.heldout_tokens[tap][start : start + SCORE_BATCH] for tap in layers})
        features = tokenizer.semantic_features(codes.semantic)  # (B, h*w, W)
        teacher = taps.heldout_tokens[layer][start : start + SCORE_BATCH]  # (B, h*w, W)
        heldout_rows["token_cosine"] += token_cosine(features, teacher).tolist()
        if with_head:
            ranked = tokenizer.pool_from_features(features).topk(TOP_K, dim=-1).indices  # (B, 5)
            truth = torch.tensor([labels[i] for i in ids])[:, None]
            heldout_rows["top1"] += (ranked[:, :1] == truth).any(-1).float().tolist()
            heldout_rows["top5"] += (ranked == truth).any(-1).float().tolist()
        vocabularies = {"semantic": codes.semantic}
        if tokenizer.config.pixel_quantizer is not None:
            vocabularies["pixel"] = codes.pixel
        for name, grid in vocabularies.items():
            counts = code_histogram(grid, tokenizer.codebook_size(name))  # (Q, K)
            histograms[name] = histograms[name] + counts if name in histograms else counts
    usage = {name: [float((h > 0).double().mean()) for h in counts] for name, counts in histograms.items()}
    return {"kodak": kodak_rows, "heldout": heldout_rows, "usage": usage, "with_head": with_head,
            "semantic_layer": layer}


def _batches(source, limit: int | None):
    """(images (B, 3, H, W), ids) in batches of SCORE_BATCH from an image source, its first ``limit`` images."""
    images, ids = [], []
    for index, (image, image_id) in enumerate(source):
        if limit is not None and index == limit:
            break
        images.append(image)
        ids.append(image_id)
        if len(images) == SCORE_BATCH:
            yield torch.stack(images), ids
            images, ids = [], []
    if images:
        yield torch.stack(images), ids


def summarize(scores: dict, resamples: int) -> dict:
    """Bootstrap intervals of every per-image score (None where a run has none)."""
    rows = {**{k: scores["kodak"][k] for k in ("psnr", "ssim")},
            **{k: scores["heldout"][k] for k in ("top1", "top5", "token_cosine")}}
    return {name: bootstrap(torch.tensor(values), resamples) if values else None for name, values in rows.items()}


def differences(runs: dict[str, dict], scores: dict[str, dict], resamples: int) -> list[dict]:
    """(d) - (a), (d) - (b), (d) - (c) with paired bootstrap intervals, for every seed of (d); the other variant's
    run of the same seed where it has one, else its recipe-seed run. Token cosine is compared only where both runs
    distill at the same tap (the teacher's features differ between taps)."""
    by_variant: dict[str, dict[int, str]] = {}
    for name, run in runs.items():
        by_variant.setdefault(run["letter"], {})[run["seed"]] = name
    rows = []
    for seed, dual in by_variant.get("d", {}).items():
        for letter in COMPARED:
            if letter not in by_variant:
                continue
            other = by_variant[letter].get(seed) or next(iter(by_variant[letter].values()))
            row = {"pair": f"{dual} - {other}"}
            for metric, part in (("psnr", "kodak"), ("ssim", "kodak"), ("top1", "heldout"), ("top5", "heldout"),
                                 ("token_cosine", "heldout")):
                mine, theirs = scores[dual][part], scores[other][part]
                if mine["id"] != theirs["id"]:
                    raise DataError(f"{dual} and {other} were scored on different images")
                comparable = metric != "token_cosine" or scores[dual]["semantic_layer"] == scores[other]["semantic_layer"]
                if not (mine[metric] and theirs[metric] and comparable):
                    row[metric] = None
                    continue
                delta = torch.tensor(mine[metric]) - torch.tensor(theirs[metric])  # per image
                row[metric] = {**bootstrap(delta, resamples), "verdict": None}
                row[metric]["verdict"] = verdict(row[metric])
            rows.append(row)
    return rows


# ----------------------------------------------------------------------------------------------------------------
# tables
# ----------------------------------------------------------------------------------------------------------------


def _cell(entry: dict | None, scale: float = 1.0, digits: int = 2) -> str:
    if entry is None:
        return "n/a"
    mean, low, high = (entry[k] * scale for k in ("mean", "low", "high"))
    return f"{mean:.{digits}f} [{low:.{digits}f}, {high:.{digits}f}]"


METRICS = (("psnr", "Kodak PSNR (dB)", 1.0, 2), ("ssim", "Kodak SSIM", 1.0, 3), ("top1", "held-out top-1 (%)", 100.0, 1),
           ("top5", "held-out top-5 (%)", 100.0, 1), ("token_cosine", "token cosine", 1.0, 3))


def table(rows: list[dict]) -> str:
    """One row per run: its shape, steps, training time and scores with their intervals."""
    lines = [
        "| run | tap(s) | codes per position | bits / position | steps trained | training s | scored step | "
        + " | ".join(title for _, title, _, _ in METRICS) + " |",
        "|---" * (7 + len(METRICS)) + "|",
    ]
    for row in rows:
        cells = [_cell(row["scores"][key], scale, digits) for key, _, scale, digits in METRICS]
        lines.append(
            f"| {row['run']} | {row['taps']} | {row['codes']} | {row['bits']} | {row['steps']} | {row['seconds']:.0f} | "
            f"{row['step']} | " + " | ".join(cells) + " |"
        )
    return "\n".join(lines) + "\n"


def difference_table(rows: list[dict]) -> str:
    """(d) - (x) per metric: mean [paired 95 % interval] and the verdict the interval gives."""
    lines = ["| difference | " + " | ".join(title for _, title, _, _ in METRICS) + " |", "|---" * (1 + len(METRICS)) + "|"]
    for row in rows:
        cells = [
            "n/a" if row[key] is None else f"{_cell(row[key], scale, digits)} {row[key]['verdict']}"
            for key, _, scale, digits in METRICS
        ]
        lines.append(f"| {row['pair']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def usage_table(rows: list[dict]) -> str:
    """Share of the K codes each depth used over the held-out images."""
    lines = ["| run | vocabulary | codes used per depth (share of K) |", "|---|---|---|"]
    for row in rows:
        for vocabulary, shares in row["usage"].items():
            lines.append(f"| {row['run']} | {vocabulary} | {' / '.join(f'{s:.2f}' for s in shares)} |")
    return "\n".join(lines) + "\n"


def figure(rows: list[dict], path: Path) -> Path | None:
    """Kodak PSNR against held-out top-1, one point per run with its 95 % intervals on both axes (None without an
    ImageNet head: no top-1 to plot)."""
    if any(row["scores"]["top1"] is None for row in rows):
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=110)
    for row in rows:
        top1, value = row["scores"]["top1"], row["scores"]["psnr"]
        x, y = 100.0 * top1["mean"], value["mean"]
        ax.errorbar(x, y, xerr=[[x - 100.0 * top1["low"]], [100.0 * top1["high"] - x]],
                    yerr=[[y - value["low"]], [value["high"] - y]], fmt="o", capsize=3,
                    color=COLORS[row["variant"][0]], mfc="white" if row["seed"] else None)
        ax.annotate(row["run"], (x, y), textcoords="offset points", xytext=(6, 4), fontsize=7)
    ax.set_xlabel("held-out top-1 through the quantized semantic path (%)")
    ax.set_ylabel("Kodak PSNR (dB)")
    ax.set_title(f"equal bits per position, step {rows[0]['step']} (95 % bootstrap intervals)", fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def curve_table(runs: dict[str, dict], curves: dict[str, list[dict]], images: int | None) -> str:
    """Held-out top-1, token cosine and Kodak PSNR of every run at every scored export step."""
    steps = [point["step"] for point in next(iter(curves.values()))]
    lines = ["| run | " + " | ".join(f"step {step}" for step in steps) + " |", "|---" * (1 + len(steps)) + "|"]
    for name in runs:
        cells = [
            ("n/a" if p["top1"] is None else f"{100.0 * p['top1']:.1f} %") + f" / {p['token_cosine']:.3f} / {p['psnr']:.2f} dB"
            for p in curves[name]
        ]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    where = f"the first {images} images of each set" if images else "every image"
    return (f"Learning curves ({where}): held-out top-1 / token cosine / Kodak PSNR at each export:\n\n"
            + "\n".join(lines) + "\n")


def curve_figure(runs: dict[str, dict], curves: dict[str, list[dict]], path: Path) -> Path | None:
    """Held-out top-1, token cosine (runs distilled at the deep tap's layer only) and Kodak PSNR against steps, a
    line per run (colour: variant; dashed: a second seed)."""
    if any(point["top1"] is None for points in curves.values() for point in points):
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(12.0, 3.6), dpi=100)
    deep = max(points[0]["semantic_layer"] for points in curves.values())
    for name, run in runs.items():
        steps = [point["step"] for point in curves[name]]
        style = {"color": COLORS[run["letter"]], "linestyle": "--" if run["seed"] else "-", "marker": "o",
                 "markersize": 3, "label": name}
        axes[0].plot(steps, [100.0 * point["top1"] for point in curves[name]], **style)
        if curves[name][0]["semantic_layer"] == deep:
            axes[1].plot(steps, [point["token_cosine"] for point in curves[name]], **style)
        axes[2].plot(steps, [point["psnr"] for point in curves[name]], **style)
    labels = ("held-out top-1, quantized semantic path (%)", f"token cosine to the teacher at layer {deep}",
              "Kodak PSNR (dB)")
    for ax, label in zip(axes, labels):
        ax.set_xlabel("training step")
        ax.set_ylabel(label, fontsize=8)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def describe(model: TokenizerConfig) -> tuple[str, str]:
    """The taps and the codes per position of a model config."""
    semantic = model.semantic_quantizer
    if model.pixel_quantizer is None:
        return f"layer {model.semantic_layer}", f"{semantic.depth} x K={semantic.codebook_size}"
    pixel = model.pixel_quantizer
    return (
        f"pixel {model.pixel_layer}, semantic {model.semantic_layer}",
        f"{pixel.depth} x K={pixel.codebook_size} + {semantic.depth} x K={semantic.codebook_size}",
    )


# ----------------------------------------------------------------------------------------------------------------
# the command
# ----------------------------------------------------------------------------------------------------------------


def train_run(folder: Path, config: TrainConfig) -> dict:
    """Train one run unless its summary exists. The summary holds the steps reached and the wall seconds of the
    process that finished the run; ``resumed`` says it continued a checkpoint of an interrupted process, whose
    seconds are then not counted."""
    done = folder / "summary.json"
    if done.is_file():
        return json.loads(done.read_text())
    resumed = any((folder / "checkpoints").glob("*.pt"))
    started = time.perf_counter()
    summary = train(config)
    summary["seconds"] = round(time.perf_counter() - started, 1)
    summary["resumed"] = resumed
    done.write_text(json.dumps(summary, indent=2) + "\n")
    return summary


class Scorer:
    """Scores exports at the scoring size, each once (per-image scores cached beside the export), on the tower's
    tokens of the scored images: those of the first ``--eval-images`` images, computed at the first call and kept in
    ``<out>/eval-taps-<size>px-<N>.pt``; a smaller ``limit`` scores the first ``limit`` of them."""

    def __init__(self, args: argparse.Namespace, layers: list[int]) -> None:
        self.args, self.layers = args, layers
        self.taps: EvalTaps | None = None

    def __call__(self, folder: Path, step: int, limit: int | None = None) -> tuple[DualTokenizer, dict]:
        """The run's export at ``step`` at the scoring size, and its per-image scores on the first ``limit`` images
        of each set (default ``--eval-images``)."""
        args = self.args
        limit = args.eval_images if limit is None else limit
        tokenizer = DualTokenizer.from_pretrained(folder / f"export-{step:08d}")
        if args.eval_size and tokenizer.image_size != (args.eval_size, args.eval_size):
            tokenizer = tokenizer.at_resolution(args.eval_size)
        size = tokenizer.image_size[0]
        cache = folder / f"scores-{step:08d}-{size}px-{limit or 'all'}.json"
        if cache.is_file():
            return tokenizer, json.loads(cache.read_text())
        if self.taps is None:
            self.taps = self._eval_taps(tokenizer, Path(args.out) / f"eval-taps-{size}px-{args.eval_images or 'all'}.pt")
        scores = per_image_scores(tokenizer, self.taps.first(limit), args.heldout)
        _write_atomic(cache, lambda path: path.write_text(json.dumps(scores) + "\n"))
        return tokenizer, scores

    def _eval_taps(self, tokenizer: DualTokenizer, path: Path) -> EvalTaps:
        if path.is_file():
            return EvalTaps(**torch.load(path, weights_only=True))
        taps = eval_taps(tokenizer, self.layers, self.args.kodak, self.args.heldout, self.args.eval_images)
        _write_atomic(path, lambda target: torch.save(dataclasses.asdict(taps), target))
        return taps


def _write_atomic(path: Path, write) -> None:
    """``write(temporary path)``, then rename: an interrupted write leaves no half file."""
    partial = path.with_name(path.name + ".tmp")
    write(partial)
    partial.replace(path)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="the equal-bits ablation: train (a)-(d), score, write the tables")
    parser.add_argument("--recipe", default=str(HERE / "cpu.json"))
    parser.add_argument("--out", default="runs/ablation")
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--budget-seconds", type=float, default=0.0, help="wall-clock budget of each run (0: none)")
    parser.add_argument("--export-every", type=int, default=250)
    parser.add_argument("--seeds", nargs="*", default=[], help="more seeds of a variant: a=0,1 d=0,1")
    parser.add_argument("--kodak", default="../shared/data/kodak")
    parser.add_argument("--heldout", default=str(HERE / "heldout.tsv"))
    parser.add_argument("--eval-size", type=int, default=None, help="score at this image size (default: trained)")
    parser.add_argument("--eval-images", type=int, default=None, help="score only the first N images of each set")
    parser.add_argument("--curve-images", type=int, default=None,
                        help="score the learning curves' exports on the first N images of each set (default: as the table)")
    parser.add_argument("--bootstrap", type=int, default=2000)
    parser.add_argument("--set", action="append", default=[], help="key.sub=value on the recipe for every run")
    return parser.parse_args(argv)


def run(args: argparse.Namespace) -> Path:
    out = Path(args.out)
    if not Path(args.recipe).is_file():
        raise DataError(f"no recipe at {args.recipe}")
    budget = [f"max_steps={args.steps}", f"max_seconds={args.budget_seconds}", f"checkpoint.export_every={args.export_every}"]
    base = load_train_config(args.recipe, [*args.set, *budget])
    runs = plan_runs(recipe_model(base), parse_seeds(args.seeds, base.seed), base.seed)
    check_paths(base, args.kodak, args.heldout)

    model = recipe_model(base)
    layers = sorted({model.pixel_layer, model.semantic_layer})
    summaries = {}
    for name, plan in runs.items():
        crops = out / f"crops-seed{plan['seed']}"  # one tap cache per seed, shared by the variants
        shared = [f"cache.folder={crops}", f"cache.layers={layers}"] if base.cache.taps else []
        config = variant_config(base, [*plan["overrides"], f"output_dir={out / name}", *shared])
        summaries[name] = train_run(out / name, config)

    common, exports = common_export_step([out / name for name in runs])
    scorer = Scorer(args, layers)
    curve_steps = sorted(set.intersection(*(set(steps) for steps in exports.values())))
    curves = {name: [] for name in runs}
    for name in tqdm(runs, desc="score", disable=not base.log.progress):
        for step in curve_steps:
            _, scores = scorer(out / name, step, args.curve_images)
            summary = summarize(scores, args.bootstrap)
            means = {k: None if v is None else v["mean"] for k, v in summary.items()}
            curves[name].append({"step": step, "semantic_layer": scores["semantic_layer"], **means})
    rows, scores = [], {}
    for name in runs:
        tokenizer, scores[name] = scorer(out / name, common)
        taps, codes = describe(tokenizer.config)
        rows.append({"run": name, **{k: runs[name][k] for k in ("variant", "seed")}, "taps": taps, "codes": codes,
                     "bits": bits_per_position(tokenizer.config), "steps": summaries[name]["step"],
                     "seconds": summaries[name]["seconds"], "step": common,
                     "scores": summarize(scores[name], args.bootstrap), "usage": scores[name]["usage"]})
    diffs = differences(runs, scores, args.bootstrap)
    header = (
        f"# Equal-bits ablation\n\nRecipe `{args.recipe}`, {args.steps} steps at most, "
        f"{args.budget_seconds or 'no'} s budget per run; scored at step {common} (the largest export every "
        f"run reached), at {args.eval_size or 'the trained'} px; Kodak: {rows[0]['scores']['psnr']['n']} images, "
        f"held-out: {len(scores[next(iter(runs))]['heldout']['id'])} images. Means with 95 % bootstrap intervals "
        f"over images ({args.bootstrap} resamples); differences with paired intervals (the same resampled images "
        f"for both runs) and the verdict they give.\n\n"
    )
    text = header + table(rows) + "\n" + difference_table(diffs) + "\n" + usage_table(rows)
    text += "\n" + curve_table(runs, curves, args.curve_images)
    (out / "ablation.json").write_text(
        json.dumps({"common_step": common, "exports": exports, "rows": rows, "differences": diffs, "curves": curves},
                   indent=2) + "\n"
    )
    (out / "ablation.md").write_text(text)
    figure(rows, out / "ablation.png")
    curve_figure(runs, curves, out / "curves.png")
    print(text)
    return out / "ablation.md"


def main(argv: list[str] | None = None) -> Path:
    """The command: bad input is one line on stderr and exit code 2, before anything trains."""
    args = parse_args(argv)
    try:
        return run(args)
    except DualTokenError as error:
        print(f"ablation: {error}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
