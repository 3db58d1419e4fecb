"""The pixel codebook at equal bits: today's restarts against per-depth liveness and per-depth codebooks.

Every variant quantizes the same cached pixel latents of the shipped ``dualtoken-efflite0`` (tower, shortcut and
down-projection frozen below the pixel tap, 256 px, 16x16 positions) with K = 1,024 codes at each of Q = 4 depths,
40 bits per position. Only the quantizer learns (its EMA and restarts, as in training); the shipped decoder turns
each variant's codes back into pixels, so the table isolates what the codebook does with its bits:

    python recipes/efflite0/pixel_liveness.py --out runs/pixel-liveness

Per variant: code usage per depth over the last training window, then on Kodak (scoring only) and on held-out
ImageNet photos never trained on (``heldout.tsv``): usage, perplexity and encode-decode-encode stability per depth
(``dualtoken eval --metrics codebook``), latent MSE and PSNR by depth. Writes ``results.json`` and ``table.md`` (also
printed) into ``--out``, and each variant's model folder (``<variant>/model``, for ``dualtoken eval`` or the page).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import time
from pathlib import Path

import torch
from tqdm import tqdm

from dualtoken import DualTokenizer
from dualtoken.checkpoint import save_pretrained
from dualtoken.config import QuantizerConfig
from dualtoken.data.images import open_image_source
from dualtoken.evaluation.codebook_stats import code_histogram, usage_stats
from dualtoken.evaluation.protocol import to_uint8_levels
from dualtoken.metrics import psnr
from dualtoken.quantizer import ResidualQuantizer

HERE = Path(__file__).resolve().parent
# name -> (quantizer settings, k-means start)
VARIANTS = {
    "release_kmeans": ({}, True),
    "depth_liveness_kmeans": ({"restart_liveness": "per_depth"}, True),
    "per_depth_kmeans": ({"codebook_sharing": "per_depth"}, True),
    "release_random": ({}, False),
    "depth_liveness_random": ({"restart_liveness": "per_depth"}, False),
    "per_depth_random": ({"codebook_sharing": "per_depth"}, False),
}
KMEANS_SHARES = [4.0, 2.0, 1.0, 1.0]  # the shared codebook's k-means start, as recipes/efflite0/pixel.json


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--model", default="dualtoken-efflite0")
    parser.add_argument("--train", default=str(HERE / "train_all.txt"), help="training images (file list)")
    parser.add_argument("--train-images", type=int, default=256, help="how many training images are cached")
    parser.add_argument("--kodak", default=str(HERE / "../../../shared/data/kodak"))
    parser.add_argument("--unseen", default=str(HERE / "heldout.tsv"), help="photos never trained on")
    parser.add_argument("--unseen-images", type=int, default=24)
    parser.add_argument("--steps", type=int, default=400, help="EMA updates per variant")
    parser.add_argument("--batch-images", type=int, default=16, help="images per update")
    parser.add_argument("--window", type=int, default=100, help="updates per usage record")
    parser.add_argument("--kmeans-images", type=int, default=128, help="images whose latents start k-means")
    parser.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args()


@torch.no_grad()
def load_images(tok: DualTokenizer, spec: str, count: int) -> torch.Tensor:
    """The first ``count`` images of ``spec`` (centre crops at the model's size, as ``dualtoken eval``): (N, 3, H, W)."""
    images = []
    for image, _ in tqdm(open_image_source(spec, tok.image_size), total=count, desc=f"images {Path(spec).name}"):
        images.append(image)
        if len(images) == count:
            break
    return torch.stack(images)


@torch.no_grad()
def pixel_latents(tok: DualTokenizer, images: torch.Tensor, batch: int = 16) -> torch.Tensor:
    """What the pixel quantizer receives: (N, h*w, D)."""
    return torch.cat([tok.pixel_latents(images[i : i + batch]) for i in range(0, len(images), batch)])


def train_quantizer(config: QuantizerConfig, kmeans: bool, latents: torch.Tensor, args) -> tuple:
    """A quantizer trained by its EMA on random batches of cached latents; returns it and its usage records."""
    torch.manual_seed(args.seed)
    quantizer = ResidualQuantizer(config)
    generator = torch.Generator().manual_seed(args.seed)
    per_update = args.batch_images * latents.shape[1]
    if kmeans:
        start = latents[: args.kmeans_images].flatten(0, 1)
        shares = None if config.codebook_sharing == "per_depth" else KMEANS_SHARES
        quantizer.init_from_data(start, per_update, generator=generator, shares=shares)
    quantizer.train()
    records, window = [], torch.zeros(config.depth, config.codebook_size, dtype=torch.long)
    for step in tqdm(range(1, args.steps + 1), desc="EMA updates"):
        index = torch.randint(latents.shape[0], (args.batch_images,), generator=generator)
        codes = quantizer(latents[index]).codes  # (B, h*w, Q)
        window += code_histogram(codes, config.codebook_size)
        if step % args.window == 0:
            records.append({"step": step, "usage": [usage_stats(window[q])["usage"] for q in range(config.depth)]})
            window.zero_()
    return quantizer.eval(), records


@torch.no_grad()
def score(
    tok: DualTokenizer, quantizer: ResidualQuantizer, images: torch.Tensor, latents: torch.Tensor, every_depth: bool
) -> dict:
    """Per depth q: code usage and perplexity, latent MSE and PSNR of the first q depths (all Q only, unless
    ``every_depth``), and the share of positions whose depth-q code comes back when the 8-bit reconstruction is
    encoded again (the definitions of ``dualtoken eval --metrics codebook,rate_distortion``)."""
    codes = quantizer(latents).codes  # (N, h*w, Q)
    depths = range(1 if every_depth else quantizer.depth, quantizer.depth + 1)
    histogram = code_histogram(codes, quantizer.codebook_size)
    stats = [usage_stats(histogram[q]) for q in range(quantizer.depth)]
    psnrs, latent_mse, reconstruction = [], [], None
    for k in depths:
        latent = quantizer.decode(codes[..., :k])  # (N, h*w, D)
        latent_mse.append(float((latents - latent).pow(2).mean()))
        reconstruction = torch.cat([tok.decoder(tok.pixel.up(latent[i : i + 8])) for i in range(0, len(latent), 8)])
        psnrs.append(float(psnr(reconstruction, images).mean()))
    again = quantizer(pixel_latents(tok, to_uint8_levels(reconstruction))).codes
    return {
        "images": len(images),
        "usage": [s["usage"] for s in stats],
        "perplexity": [s["perplexity"] for s in stats],
        "stability": (again == codes).float().mean(dim=(0, 1)).tolist(),
        "latent_mse": latent_mse,
        "psnr": psnrs,
    }


@torch.no_grad()
def unquantized_psnr(tok: DualTokenizer, images: torch.Tensor, latents: torch.Tensor) -> float:
    """PSNR of the shipped decoder given the unquantized latents: what no codebook at this decoder can beat."""
    reconstruction = torch.cat([tok.decoder(tok.pixel.up(latents[i : i + 8])) for i in range(0, len(latents), 8)])
    return float(psnr(reconstruction, images).mean())


def with_quantizer(tok: DualTokenizer, quantizer: ResidualQuantizer, name: str) -> DualTokenizer:
    """A copy of ``tok`` whose pixel vocabulary is ``quantizer`` (its folder loads with ``from_pretrained``)."""
    variant = copy.deepcopy(tok)
    variant.pixel.quantizer = quantizer
    variant.config = dataclasses.replace(tok.config, name=name, pixel_quantizer=quantizer.config)
    return variant.eval()


def table(results: dict) -> str:
    def pct(values):
        return " / ".join(f"{100 * v:.0f}" for v in values)

    lines = [
        "| variant | usage %, training (last window) | Kodak usage % | Kodak perplexity | Kodak stability % "
        "| Kodak latent MSE @4 | Kodak PSNR @1 / @2 / @3 / @4 | unseen usage % | unseen PSNR @4 |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        k, u = r["kodak"], r["unseen"]
        if name == "unquantized":
            lines.append(f"| unquantized latents | - | - | - | - | 0 | {k['psnr'][0]:.2f} at any depth | - | {u['psnr'][0]:.2f} |")
            continue
        training = pct(r["training"][-1]["usage"]) if r["training"] else "-"
        lines.append(
            f"| {name} | {training} | {pct(k['usage'])} | {' / '.join(f'{p:.0f}' for p in k['perplexity'])} "
            f"| {pct(k['stability'])} | {k['latent_mse'][-1]:.4f} | {' / '.join(f'{p:.2f}' for p in k['psnr'])} "
            f"| {pct(u['usage'])} | {u['psnr'][-1]:.2f} |"
        )
    return "\n".join(lines) + "\n"


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def main() -> None:
    args = parse_args()
    torch.set_grad_enabled(False)
    args.out.mkdir(parents=True, exist_ok=True)
    tok = DualTokenizer.from_pretrained(args.model).eval()
    unseen_list = args.out / "unseen.txt"
    unseen = [line.split("\t")[0] for line in Path(args.unseen).read_text().splitlines()[1:]][: args.unseen_images]
    unseen_list.write_text("\n".join(str((Path(args.unseen).parent / p).resolve()) for p in unseen) + "\n")
    started = time.time()
    train = pixel_latents(tok, load_images(tok, args.train, args.train_images))
    sets = {name: load_images(tok, spec, count) for name, spec, count in
            (("kodak", args.kodak, 24), ("unseen", str(unseen_list), args.unseen_images))}
    latents = {name: pixel_latents(tok, images) for name, images in sets.items()}
    results_path = args.out / "results.json"
    results = json.loads(results_path.read_text()) if results_path.is_file() else {}
    def scores(quantizer: ResidualQuantizer) -> dict:
        return {n: score(tok, quantizer, sets[n], latents[n], every_depth=n == "kodak") for n in sets}

    if "shipped" not in results:
        results["shipped"] = {"training": [], **scores(tok.pixel.quantizer)}
    if "unquantized" not in results:  # the decoder's ceiling: the latents themselves, no codes
        results["unquantized"] = {n: {"psnr": [unquantized_psnr(tok, sets[n], latents[n])]} for n in sets}
    for name in args.variants:
        if name in results:
            continue  # done in an earlier sitting
        settings, kmeans = VARIANTS[name]
        config = dataclasses.replace(tok.config.pixel_quantizer, **settings)
        quantizer, records = train_quantizer(config, kmeans, train, args)
        save_pretrained(with_quantizer(tok, quantizer, f"pixel-liveness-{name}"), args.out / name / "model")
        results[name] = {"settings": settings, "kmeans": kmeans, "training": records,
                         **scores(quantizer)}
        write_atomic(results_path, json.dumps(results, indent=1))
        print(f"{name}: done at {time.time() - started:.0f} s", flush=True)
    write_atomic(results_path, json.dumps(results, indent=1))
    text = table(results)
    write_atomic(args.out / "table.md", text)
    print(text)


if __name__ == "__main__":
    main()
