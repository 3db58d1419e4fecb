"""The paper's ablation at equal bits, as one command: train four tokenizers with the same recipe, data, steps and
wall-clock budget, evaluate each at the largest export step all of them reached, and write a markdown table.

  (a) one codebook at the deep tap, both losses, as many bits per position as DualToken's two vocabularies
  (b) one codebook at the deep tap, reconstruction only (same bits as (a))
  (c) one codebook at the shallow tap, reconstruction only (same bits as (a))
  (d) DualToken: the pixel vocabulary at the shallow tap, the semantic one at the deep tap

The single codebook keeps the semantic vocabulary's K and takes the depth that spends DualToken's bits. Scores:
Kodak PSNR / SSIM of the full-depth reconstruction and held-out top-1 of the pooled output (a backbone whose
pooled output is ImageNet logits), each a mean over images with a 95 % percentile bootstrap interval. Variants
run one after the other (resumable: a finished variant is not trained again).

usage: python recipes/efflite0/ablation.py --out runs/ablation --steps 3000 --budget-seconds 900 --eval-size 256
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import math
import time
from pathlib import Path

import torch
from tqdm import tqdm

from dualtoken import DualTokenizer, get_config
from dualtoken.config import TokenizerConfig, apply_overrides
from dualtoken.data import open_image_source
from dualtoken.evaluation.samples import labels_from_tsv
from dualtoken.metrics import psnr, ssim
from dualtoken.training import TrainConfig, load_train_config, train

HERE = Path(__file__).parent
IMAGENET_CLASSES = 1000


def _load_pack():
    spec = importlib.util.spec_from_file_location("efflite0_pack", HERE / "pack.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def bits_per_position(config: TokenizerConfig) -> int:
    """Bits one grid position spends: sum over vocabularies of depth x log2(K)."""
    quantizers = [q for q in (config.pixel_quantizer, config.semantic_quantizer) if q is not None]
    return round(sum(q.depth * math.log2(q.codebook_size) for q in quantizers))


def variants(model: TokenizerConfig) -> dict[str, list[str]]:
    """Each variant's overrides on the recipe (``model_overrides`` entries prefixed with ``model:``)."""
    semantic = model.semantic_quantizer
    depth = bits_per_position(model) / math.log2(semantic.codebook_size)
    if depth != int(depth):
        raise SystemExit(f"{bits_per_position(model)} bits do not make whole depths of K={semantic.codebook_size}")
    single = ["model:pixel_quantizer=null", "model:shortcut_layer=null", f"model:semantic_quantizer.depth={int(depth)}"]
    recon = ["loss.semantic_weight=0", "teacher=none"]
    return {
        "a_single_deep_both": [*single, f"model:pixel_layer={model.semantic_layer}"],
        "b_single_deep_recon": [*single, f"model:pixel_layer={model.semantic_layer}", *recon],
        "c_single_shallow_recon": [*single, f"model:semantic_layer={model.pixel_layer}", *recon],
        "d_dualtoken": [],
    }


def variant_config(base: TrainConfig, overrides: list[str]) -> TrainConfig:
    """``base`` with a variant's overrides: ``model:`` entries join its ``model_overrides``, the rest apply as set."""
    model = [o.removeprefix("model:") for o in overrides if o.startswith("model:")]
    rest = [o for o in overrides if not o.startswith("model:")]
    return apply_overrides(dataclasses.replace(base, model_overrides=[*base.model_overrides, *model]), rest)


def recipe_model(config: TrainConfig) -> TokenizerConfig:
    source = Path(config.model)
    model = TokenizerConfig.load(source) if source.suffix == ".json" else get_config(config.model)
    return apply_overrides(model, config.model_overrides)


# ----------------------------------------------------------------------------------------------------------------
# scores
# ----------------------------------------------------------------------------------------------------------------


def bootstrap(values: torch.Tensor, resamples: int, seed: int = 0) -> dict[str, float]:
    """Mean and 95 % percentile bootstrap interval of per-image ``values``."""
    values = values.double()
    generator = torch.Generator().manual_seed(seed)
    index = torch.randint(len(values), (resamples, len(values)), generator=generator)
    means = values[index].mean(dim=1)
    low, high = torch.quantile(means, torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
    return {"mean": float(values.mean()), "low": low, "high": high, "n": len(values)}


@torch.no_grad()
def score(tokenizer: DualTokenizer, kodak: str, heldout: str, limit: int | None, resamples: int) -> dict:
    """Kodak PSNR / SSIM and held-out top-1 (None without an ImageNet head), each with its bootstrap interval."""
    tokenizer.eval()
    size = tokenizer.image_size
    rows: dict[str, list[torch.Tensor]] = {"psnr": [], "ssim": []}
    for image, _ in _first(open_image_source(kodak, size), limit):
        images = image[None]
        reconstruction = tokenizer.decode(tokenizer.encode(images).pixel).float()
        rows["psnr"].append(psnr(reconstruction, images))
        rows["ssim"].append(ssim(reconstruction, images))
    results = {name: bootstrap(torch.cat(values), resamples) for name, values in rows.items()}
    results["top1"] = None
    if tokenizer.backbone.pooled_width == IMAGENET_CLASSES:
        _, labels = labels_from_tsv(Path(heldout))
        hits = []
        for image, image_id in _first(open_image_source(heldout, size), limit):
            if labels.get(image_id, -1) < 0:
                continue
            pooled = tokenizer.pooled_embedding(tokenizer.encode(image[None]).semantic)
            hits.append(float(pooled.argmax(-1).item() == labels[image_id]))
        results["top1"] = bootstrap(torch.tensor(hits), resamples)
    return results


def _first(iterable, limit: int | None):
    for index, item in enumerate(iterable):
        if limit is not None and index == limit:
            return
        yield item


def table(rows: list[dict]) -> str:
    def cell(entry: dict | None, scale: float = 1.0, digits: int = 2) -> str:
        if entry is None:
            return "n/a"
        return f"{entry['mean'] * scale:.{digits}f} [{entry['low'] * scale:.{digits}f}, {entry['high'] * scale:.{digits}f}]"

    lines = [
        "| variant | tap(s) | codes per position | bits / position | step | Kodak PSNR (dB) | Kodak SSIM | held-out top-1 (%) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        scores = row["scores"]
        lines.append(
            f"| {row['variant']} | {row['taps']} | {row['codes']} | {row['bits']} | {row['step']} | "
            f"{cell(scores['psnr'])} | {cell(scores['ssim'], digits=3)} | {cell(scores['top1'], 100.0, 1)} |"
        )
    return "\n".join(lines) + "\n"


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


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description="the equal-bits ablation: train (a)-(d), score, write a table")
    parser.add_argument("--recipe", default=str(HERE / "cpu.json"))
    parser.add_argument("--out", default="runs/ablation")
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--budget-seconds", type=float, default=0.0, help="wall-clock budget of each variant (0: none)")
    parser.add_argument("--export-every", type=int, default=250)
    parser.add_argument("--kodak", default="../shared/data/kodak")
    parser.add_argument("--heldout", default=str(HERE / "heldout.tsv"))
    parser.add_argument("--eval-size", type=int, default=None, help="evaluate at this image size (default: trained)")
    parser.add_argument("--eval-images", type=int, default=None, help="score only the first N images of each set")
    parser.add_argument("--bootstrap", type=int, default=2000)
    parser.add_argument("--set", action="append", default=[], help="key.sub=value on the recipe for every variant")
    args = parser.parse_args(argv)

    out = Path(args.out)
    budget = [f"max_steps={args.steps}", f"max_seconds={args.budget_seconds}", f"checkpoint.export_every={args.export_every}"]
    base = load_train_config(args.recipe, [*args.set, *budget])
    plan = variants(recipe_model(base))
    for name, overrides in plan.items():
        done = out / name / "summary.json"
        if done.is_file():
            continue
        config = variant_config(base, [*overrides, f"output_dir={out / name}"])
        started = time.perf_counter()
        summary = train(config)
        summary["seconds"] = round(time.perf_counter() - started, 1)
        done.write_text(json.dumps(summary, indent=2) + "\n")

    common, exports = _load_pack().common_export_step([out / name for name in plan])
    rows = []
    for name in tqdm(plan, desc="score", disable=not base.log.progress):
        tokenizer = DualTokenizer.from_pretrained(out / name / f"export-{common:08d}")
        if args.eval_size and tokenizer.image_size != (args.eval_size, args.eval_size):
            tokenizer = tokenizer.at_resolution(args.eval_size)
        taps, codes = describe(tokenizer.config)
        scores = score(tokenizer, args.kodak, args.heldout, args.eval_images, args.bootstrap)
        rows.append({"variant": name, "taps": taps, "codes": codes, "bits": bits_per_position(tokenizer.config),
                     "step": common, "scores": scores})
    size = rows[0]["scores"]["psnr"]["n"]
    header = (
        f"# Equal-bits ablation\n\nRecipe `{args.recipe}`, {args.steps} steps at most, "
        f"{args.budget_seconds or 'no'} s budget per variant; scored at step {common} (the largest export every "
        f"variant reached), at {args.eval_size or 'the trained'} px; Kodak: {size} images. "
        f"Means with 95 % bootstrap intervals ({args.bootstrap} resamples).\n\n"
    )
    (out / "ablation.json").write_text(json.dumps({"common_step": common, "exports": exports, "rows": rows}, indent=2) + "\n")
    (out / "ablation.md").write_text(header + table(rows))
    print(header + table(rows))
    return out / "ablation.md"


if __name__ == "__main__":
    main()
