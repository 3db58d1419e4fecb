"""How far a model's token stability is from a target, and what re-encoding fidelity the target needs.

Token stability (``dualtoken eval --metrics stability``) is the share of positions whose first pixel code comes back
when an image is encoded, decoded, rounded to 8 bits and encoded again. It depends on how far the reconstruction's
pixel latent lands from the original's, relative to the size of the first depth's cells. This script measures,
on a set of photos:

- the **re-encoding error**: MSE between the reconstruction's latent and the original's, over the latent's variance
  (the quantity ``loss.reencode`` trains down), and the stability it gives;
- the **quantization error** of the same latents (all depths), on the same scale;
- the stability the same codebook would have if the re-encoded latent were the original plus isotropic Gaussian
  noise of a given relative variance, for a few levels, and (interpolated) the level at which it reaches
  ``--target``: the re-encoding fidelity a decoder must reach for that stability with this codebook;
- the best any linear down-projection could do with this decoder's reconstructions: the tower's tokens at the
  pixel tap for the originals (signal) and the reconstructions (error = their difference) give, by a generalized
  eigenproblem, the m directions of largest signal-to-error variance ratio; the relative error of the latent they
  span, for a few widths m. The learned down-projection is not linear, so this is a yardstick, not a bound;
- with ``--fit-data``, whether another first-depth codebook would do better with the same reconstructions: k-means
  codebooks of each of ``--codebook-sizes`` codes fitted to the latents of training photos (never the probe's), and
  of the largest size looked up in the leading principal directions of those latents (``--lookup-widths``, the factorised
  low-width lookup), each scored for the stability and usage of its codes on the probe images.

    python recipes/efflite0/stability_probe.py --model dualtoken-efflite0 --out runs/stability-probe \
        --fit-data recipes/efflite0/train_all.txt

Writes ``probe.json`` and ``stability_vs_error.png`` into ``--out`` and prints a table.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import sys
from pathlib import Path

import torch

from dualtoken import DualTokenizer
from dualtoken.data.images import open_image_source
from dualtoken.errors import DualTokenError
from dualtoken.evaluation.figures import learning_curve_figure
from dualtoken.evaluation.protocol import to_uint8_levels
from dualtoken.quantizer import kmeans, nearest_codes

HERE = Path(__file__).resolve().parent
NOISE_LEVELS = (0.005, 0.01, 0.02, 0.05, 0.1, 0.2)


def relative_error(estimate: torch.Tensor, latent: torch.Tensor) -> float:
    """MSE of ``estimate`` against ``latent`` over the variance of ``latent`` (every element)."""
    return float((estimate - latent).pow(2).mean() / latent.var())


@torch.no_grad()
def first_codes(tok: DualTokenizer, latents: torch.Tensor) -> torch.Tensor:
    """The first pixel depth's codes of latents (N, h*w, D) -> (N, h*w)."""
    return tok.quantizer("pixel")(latents, update=False).codes[..., 0]


@torch.no_grad()
def latents_and_reencoded(tok: DualTokenizer, images: torch.Tensor, batch: int = 8) -> tuple[torch.Tensor, ...]:
    """The pixel latents (N, h*w, D), their quantized values, the 8-bit reconstructions (N, 3, H, W) as
    ``dualtoken eval`` makes them, and those reconstructions' latents."""
    latents, quantized, reconstructions, again = [], [], [], []
    for start in range(0, len(images), batch):
        latent = tok.pixel_latents(images[start : start + batch])
        out = tok.quantizer("pixel")(latent, update=False)
        reconstruction = to_uint8_levels(tok.decode(out.codes.view(latent.shape[0], *tok.grid, -1)))
        latents.append(latent)
        quantized.append(out.quantized)
        reconstructions.append(reconstruction)
        again.append(tok.pixel_latents(reconstruction))
    return torch.cat(latents), torch.cat(quantized), torch.cat(reconstructions), torch.cat(again)


@torch.no_grad()
def tap_tokens(tok: DualTokenizer, images: torch.Tensor, batch: int = 8) -> torch.Tensor:
    """The tower's tokens at the pixel tap (N, h*w, C): what the down-projection reads."""
    backbone, layer, out = tok.backbone, tok.config.pixel_layer, []
    for start in range(0, len(images), batch):
        state = backbone.embed(images[start : start + batch])
        for index in range(1, layer + 1):
            state = backbone.run_layer(index, state)
        out.append(backbone.to_tokens(layer, state))
    return torch.cat(out)


def best_linear_errors(tokens: torch.Tensor, tokens_again: torch.Tensor, widths: tuple[int, ...]) -> dict[int, float]:
    """Relative re-encoding error of the best m linear directions of the tap's tokens, per width m: the leading
    generalized eigenvectors of (signal covariance, error covariance)."""
    signal = tokens.flatten(0, 1).double()
    error = tokens_again.flatten(0, 1).double() - signal
    centred = signal - signal.mean(0)
    signal_cov = centred.T @ centred / len(centred)  # (C, C)
    error_cov = error.T @ error / len(error) + 1e-6 * torch.eye(signal.shape[1], dtype=torch.float64)
    whiten = torch.linalg.inv(torch.linalg.cholesky(error_cov))  # error_cov^-1/2 (lower-triangular form)
    _, vectors = torch.linalg.eigh(whiten @ signal_cov @ whiten.T)  # ascending ratios
    directions = whiten.T @ vectors.flip(1)  # (C, C), best first
    errors = {}
    for width in widths:
        latent, shift = centred @ directions[:, :width], error @ directions[:, :width]
        errors[width] = float(shift.pow(2).mean() / latent.var())
    return errors


def other_first_depths(
    fit: torch.Tensor, latents: torch.Tensor, again: torch.Tensor, sizes: tuple[int, ...], widths: tuple[int, ...],
    seed: int = 0,
) -> list[dict[str, float]]:
    """Stability and usage of first-depth codebooks fitted by k-means to ``fit`` (M, D), scored on ``latents`` and
    their re-encoded ``again`` (N, D): ``sizes`` codes at the full width, then the largest size looked up in the
    leading ``widths`` principal directions of ``fit``."""
    mean = fit.mean(0)
    directions = torch.linalg.eigh(torch.cov((fit - mean).T.double()))[1].flip(1).float()  # (D, D), largest first
    settings = [(size, fit.shape[1]) for size in sizes] + [(max(sizes), width) for width in widths]
    rows = []
    for size, width in dict.fromkeys(settings):
        def lookup(vectors: torch.Tensor, width: int = width) -> torch.Tensor:
            return (vectors - mean) @ directions[:, :width]  # (N, width)

        codebook, _ = kmeans(lookup(fit), size, iterations=15, generator=torch.Generator().manual_seed(seed))
        codes, codes_again = nearest_codes(lookup(latents), codebook), nearest_codes(lookup(again), codebook)
        rows.append({
            "codebook_size": size, "lookup_width": width,
            "stability@1": float((codes == codes_again).float().mean()),
            "usage@1": codes.unique().numel() / size,
        })
    return rows


def needed_level(curve: list[tuple[float, float]], target: float) -> float | None:
    """The noise level at which stability reaches ``target``, interpolated on log(level) between the measured
    levels; None when the curve never reaches it (or is already above it at the largest level)."""
    for (low, above), (high, below) in zip(curve, curve[1:], strict=False):
        if above >= target >= below:
            weight = (above - target) / max(above - below, 1e-12)
            return math.exp(math.log(low) * (1 - weight) + math.log(high) * weight)
    return None


@torch.no_grad()
def probe(
    tok: DualTokenizer, images: torch.Tensor, target: float, seed: int = 0, fit: torch.Tensor | None = None,
    codebook_sizes: tuple[int, ...] = (1024,), lookup_widths: tuple[int, ...] = (),
) -> dict:
    """The figures above for ``images`` (B, 3, H, W) at the model's size; the other first depths only with ``fit``
    photos (M, 3, H, W)."""
    latents, quantized, reconstructions, again = latents_and_reencoded(tok, images)
    codes = first_codes(tok, latents)
    widths = (4, latents.shape[-1] // 2, latents.shape[-1])
    linear = best_linear_errors(tap_tokens(tok, images), tap_tokens(tok, reconstructions), widths)
    generator = torch.Generator().manual_seed(seed)
    scale = latents.var().sqrt()
    curve = []
    for level in NOISE_LEVELS:
        noisy = latents + torch.randn(latents.shape, generator=generator) * scale * level**0.5
        curve.append((level, float((first_codes(tok, noisy) == codes).float().mean())))
    return {
        "images": len(images),
        "reencode_error": relative_error(again, latents),
        "quantization_error": relative_error(quantized, latents),
        "stability@1": float((first_codes(tok, again) == codes).float().mean()),
        "usage@1": codes.unique().numel() / tok.codebook_size("pixel"),
        "isotropic_noise": [{"level": level, "stability@1": value} for level, value in curve],
        "target": target,
        "level_for_target": needed_level(curve, target),
        "best_linear_projection_error": {str(width): value for width, value in linear.items()},
        "other_first_depths": [] if fit is None else other_first_depths(
            torch.cat([tok.pixel_latents(fit[start : start + 8]) for start in range(0, len(fit), 8)]).flatten(0, 1),
            latents.flatten(0, 1), again.flatten(0, 1), codebook_sizes, lookup_widths, seed,
        ),
    }


def render(result: dict) -> str:
    lines = [
        f"| re-encoding error | quantization error | stability@1 | usage@1 | noise level for {result['target']:.0%} |",
        "|---|---|---|---|---|",
    ]
    level = result["level_for_target"]
    lines.append(
        f"| {result['reencode_error']:.4f} | {result['quantization_error']:.4f} | {result['stability@1']:.1%} | "
        f"{result['usage@1']:.1%} | {'not reached' if level is None else f'{level:.4f}'} |"
    )
    noise = ", ".join(f"{row['level']:g}: {row['stability@1']:.1%}" for row in result["isotropic_noise"])
    linear = ", ".join(f"{width}: {value:.4f}" for width, value in result["best_linear_projection_error"].items())
    others = "".join(
        f"\n| {row['codebook_size']} | {row['lookup_width']} | {row['stability@1']:.1%} | {row['usage@1']:.1%} |"
        for row in result["other_first_depths"]
    )
    return "\n".join(lines) + (
        f"\n\nstability@1 under isotropic noise (level: stability): {noise}"
        f"\nbest linear projection of the tap, re-encoding error by width: {linear}"
    ) + (others and "\n\nk-means first depths, same reconstructions:\n\n"
         "| codes | lookup width | stability@1 | usage@1 |\n|---|---|---|---|" + others)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="dualtoken-efflite0", help="a model name or save_pretrained folder")
    parser.add_argument("--data", default=str(HERE / "../../../shared/data/kodak"), help="photos: a folder or list")
    parser.add_argument("--images", type=int, default=24)
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--target", type=float, default=0.6)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--fit-data", help="training photos (never the probe's) for the k-means first depths")
    parser.add_argument("--fit-images", type=int, default=128)
    parser.add_argument("--codebook-sizes", type=int, nargs="+", default=[32, 64, 128, 256, 512, 1024])
    parser.add_argument("--lookup-widths", type=int, nargs="+", default=[2, 4, 8])
    args = parser.parse_args(argv)
    try:
        tok = DualTokenizer.from_pretrained(args.model).eval()
        if tok.image_size != (args.image_size,) * 2:
            tok = tok.at_resolution(args.image_size).eval()
        images = [image for image, _ in itertools.islice(open_image_source(args.data, tok.image_size), args.images)]
        if not images:
            raise DualTokenError(f"--data {args.data}: no readable images (expected a folder or a list of photos)")
        fit, width = None, tok.config.pixel_quantizer.code_dim
        if min(args.codebook_sizes) < 1 or not all(1 <= w <= width for w in args.lookup_widths):
            raise DualTokenError(f"--codebook-sizes must be >= 1 and --lookup-widths between 1 and the code width "
                                 f"{width}, got {args.codebook_sizes} and {args.lookup_widths}")
        if args.fit_data:
            fit = [image for image, _ in itertools.islice(open_image_source(args.fit_data, tok.image_size),
                                                      args.fit_images)]
            if len(fit) < max(args.codebook_sizes) // 16:
                raise DualTokenError(f"--fit-data {args.fit_data}: {len(fit)} images are too few to fit "
                                     f"{max(args.codebook_sizes)} codes (expected at least one per 16 codes)")
            fit = torch.stack(fit)
        result = probe(tok, torch.stack(images), args.target, fit=fit, codebook_sizes=tuple(args.codebook_sizes),
                       lookup_widths=tuple(args.lookup_widths))
    except DualTokenError as error:
        print(f"stability_probe: {error}", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "probe.json").write_text(json.dumps({"model": args.model, **result}, indent=2) + "\n")
    curves = {
        "isotropic noise": [(row["level"], row["stability@1"]) for row in result["isotropic_noise"]],
        "this decoder": [(result["reencode_error"], result["stability@1"])],
    }
    learning_curve_figure(
        curves, "relative error of the re-encoded latent", "first-depth stability", args.out / "stability_vs_error.png",
        title=f"{args.model}: stability against re-encoding error",
    )
    print(render(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
