"""CPU inference side by side, one run: PyTorch eager against each candidate and the chosen default (``auto``).

Sections (all on the shipped ``dualtoken-efflite0`` and real photos, ratios against eager float32 of the same run):

- ``tower``: the EfficientNet-Lite0 forward alone (the ImageNet network, not the tokenizer): eager NCHW,
  channels_last, bf16 autocast (where the CPU has bf16 units), ``torch.compile`` (``--compile``), ONNX Runtime;
- ``api``: ``encode``, ``decode``, ``reconstruct`` (encode + decode) at batch 1 and 8, backend torch against
  onnxruntime (the default on a CPU);
- ``search``: the semantic vocabulary's residual search on real latents: this package's exact search (Gram
  matrix; per-depth float32) against faiss-cpu ``IndexFlatL2`` depth by depth, codes compared;
- ``cli``: ``dualtoken encode`` of a folder and ``dualtoken decode`` of its codes, whole commands with model load,
  ``--backend torch --precision fp32`` (the eager path) against the default;
- ``agreement``: the share of codes that differ between eager float32 and the default on Kodak-24 and the 500
  held-out images, and the largest decoded-pixel difference.

``--baseline REV`` adds an earlier commit of this repository to the ``search`` and ``cli`` sections, in the same
run: its ``src/`` is taken from git (``git archive``) into a temporary folder; the search section imports its
``quantizer.py``, the cli section runs its ``dualtoken`` (eager float32) on the same files and counts how many of
its codes differ from the default's.

Run: ``OMP_NUM_THREADS=2 .venv/bin/python benchmarks/bench_inference.py --data ../shared/data`` (sections with
``--only``). Prints a markdown table per section with the CPU's name, flags and the load average.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from timing import time_it  # benchmarks/timing.py (the script's folder is on sys.path)

from dualtoken import DualTokenizer
from dualtoken.backend import split_rows
from dualtoken.evaluation.samples import labels_from_tsv
from dualtoken.io import list_images, load_image
from dualtoken.precision import cpu_bf16_flags, cpu_has_bf16_matmul
from dualtoken.tokenfile import load_tokens

REPO = Path(__file__).resolve().parents[1]
SECTIONS = ("tower", "api", "search", "cli", "agreement")


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


def table(title: str, rows: list[tuple[str, float, str]], unit: str) -> None:
    """Rows (name, rate, note); ratios against the first row."""
    print(f"\n### {title}\n\n| | {unit} | vs {rows[0][0]} | |\n|---|---|---|---|")
    for name, rate, note in rows:
        print(f"| {name} | {rate:.1f} | {rate / rows[0][1]:.2f}x | {note} |")


def baseline_source(rev: str, into: Path) -> Path:
    """The ``src/`` folder of commit ``rev`` of this repository, extracted under ``into``."""
    archive = subprocess.run(["git", "-C", str(REPO), "archive", rev, "src"], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return into / "src"


def baseline_quantizer(source: Path):
    """The ``dualtoken.quantizer`` module of a baseline's ``source``, imported beside today's (its relative imports
    resolve to today's package: only the search functions are called)."""
    spec = importlib.util.spec_from_file_location("dualtoken._baseline_quantizer", source / "dualtoken" / "quantizer.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def photos(data: Path, count: int) -> torch.Tensor:
    files = sorted(list_images(data / "kodak"))[:count]
    return torch.stack([load_image(p, (256, 256)) for p in files])


def bench_tower(images: torch.Tensor, repeats: int, compile_too: bool) -> float:
    """Prints the tower candidates; returns the eager forward's images/s."""
    import onnxruntime as ort

    from dualtoken.features import load_efficientnet_lite0

    network = load_efficientnet_lite0(pretrained=True).eval()
    rows = []
    with torch.inference_mode():
        rows.append(("eager NCHW", len(images) / time_it(lambda: network(images), repeats), ""))
        last = network.to(memory_format=torch.channels_last)
        images_last = images.contiguous(memory_format=torch.channels_last)
        rows.append(("channels_last", len(images) / time_it(lambda: last(images_last), repeats), ""))
        network = network.to(memory_format=torch.contiguous_format)
        if cpu_has_bf16_matmul():
            with torch.autocast("cpu", dtype=torch.bfloat16):
                rows.append(("bf16 autocast", len(images) / time_it(lambda: network(images), repeats), ""))
    if compile_too:
        compiled = torch.compile(network)
        start = time.perf_counter()
        with torch.inference_mode():
            compiled(images)
            note = f"compiled in {time.perf_counter() - start:.0f} s"
            rows.append(("torch.compile", len(images) / time_it(lambda: compiled(images), repeats), note))
    with tempfile.TemporaryDirectory() as folder, torch.no_grad():
        path = Path(folder) / "tower.onnx"
        torch.onnx.export(network, (images,), str(path), dynamo=False, opset_version=17, input_names=["x"],
                          dynamic_axes={"x": {0: "b"}})
        options = ort.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        feed = {"x": images.numpy()}
        gap = float(np.abs(session.run(None, feed)[0] - network(images).numpy()).max())
        rows.append(("ONNX Runtime", len(images) / time_it(lambda: session.run(None, feed), repeats),
                     f"max abs diff {gap:.1e}"))
        options.intra_op_num_threads = 1  # what dualtoken.backend does with a batch: an image per thread
        single = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        split = lambda: split_rows(lambda part: single.run(None, {"x": part}), feed["x"])  # noqa: E731
        rows.append(("ONNX Runtime, batch split over one-thread sessions", len(images) / time_it(split, repeats),
                     "dualtoken's default"))
    table(f"EfficientNet-Lite0 forward alone, batch {len(images)}", rows, "images/s")
    return rows[0][1]


def bench_api(tokenizer: DualTokenizer, images: torch.Tensor, repeats: int, eager_tower: float | None) -> None:
    """encode / decode / reconstruct per backend (and eager bf16 where the CPU multiplies bf16 natively); with the
    eager tower's rate of the same run, encode's ratio to it."""
    paths = [("torch", "fp32"), ("onnxruntime", "fp32")]
    if cpu_has_bf16_matmul():
        paths.insert(1, ("torch", "bf16"))
    with torch.inference_mode():
        codes = tokenizer.encode(images, precision="fp32", backend="torch").pixel
        tokenizer.encode(images[:1], backend="onnxruntime")  # graphs exported (or read from the cache) before timing
        for batch in (1, 8):
            rows = []
            for backend, precision in paths:
                x, c, p = images[:batch], codes[:batch], precision
                ops = {
                    "encode": lambda x=x, b=backend, p=p: tokenizer.encode(x, p, b),
                    "decode": lambda c=c, b=backend, p=p: tokenizer.decode(c, p, b),
                    "reconstruct": lambda x=x, b=backend, p=p: tokenizer.decode(tokenizer.encode(x, p, b).pixel, p, b),
                }
                for op, fn in ops.items():
                    rows.append((f"{op} {backend} {precision}", batch / time_it(fn, repeats), ""))
            for op in ("encode", "decode", "reconstruct"):
                pair = [r for r in rows if r[0].startswith(op + " ")]
                table(f"{op}, batch {batch}", pair, "images/s")
            if eager_tower and batch == 8:
                default = next(r[1] for r in rows if r[0] == "encode onnxruntime fp32")
                print(f"\nencode (default), batch 8: {default:.1f} images/s = {default / eager_tower:.2f}x the eager "
                      f"EfficientNet-Lite0 forward alone ({eager_tower:.1f} images/s, tower section of this run)")


def bench_search(tokenizer: DualTokenizer, images: torch.Tensor, repeats: int, baseline: tuple[str, Path] | None) -> None:
    import faiss

    from dualtoken.quantizer import nearest_codes, residual_codes

    faiss.omp_set_num_threads(torch.get_num_threads())
    quantizer = tokenizer.quantizer("semantic")
    with torch.inference_mode():
        vectors = tokenizer._run_to_taps(images).semantic_latent.reshape(-1, quantizer.config.code_dim).contiguous()
        codebook = quantizer.codebook.contiguous()
        gram = codebook @ codebook.t()
        depth = quantizer.depth

        def per_depth() -> torch.Tensor:
            residual, codes = vectors.clone(), []
            for _ in range(depth):
                codes.append(nearest_codes(residual, codebook))
                residual -= codebook[codes[-1]]
            return torch.stack(codes, 1)

        index = faiss.IndexFlatL2(codebook.shape[1])
        index.add(codebook.numpy())
        book = codebook.numpy()

        def with_faiss() -> np.ndarray:
            residual, codes = vectors.numpy().copy(), []
            for _ in range(depth):
                code = index.search(residual, 1)[1][:, 0]
                codes.append(code)
                residual -= book[code]
            return np.stack(codes, 1)

        ours = residual_codes(vectors, codebook, depth, quantizer.config.search_block_rows, gram=gram)
        agree = float((torch.from_numpy(with_faiss()) == ours).float().mean())
        rows = [
            ("faiss IndexFlatL2, depth by depth", len(vectors) / time_it(with_faiss, repeats), f"codes equal {agree:.2%}"),
            ("exact search, Gram matrix", len(vectors) / time_it(
                lambda: residual_codes(vectors, codebook, depth, quantizer.config.search_block_rows, gram=gram),
                repeats), f"Gram {gram.numel() * 4 / 2**20:.0f} MiB"),
            ("exact search, per-depth float32", len(vectors) / time_it(per_depth, repeats), "no table"),
        ]
        if baseline is not None:
            old = baseline_quantizer(baseline[1])
            equal = bool(torch.equal(old.residual_codes(vectors, codebook, depth, 256, gram=gram), ours))
            rows.append((f"exact search, Gram matrix, at {baseline[0]}", len(vectors) / time_it(
                lambda: old.residual_codes(vectors, codebook, depth, 256, gram=gram), repeats),
                f"codes {'identical' if equal else 'DIFFER'}"))
    table(f"semantic search, {len(vectors)} real latents, {depth} depths of {codebook.shape[0]} codes "
          f"of width {codebook.shape[1]}", rows, "vectors/s")


def bench_cli(data: Path, count: int, baseline: tuple[str, Path] | None) -> None:
    source = data / "imagenet_samples" / "images"
    files = sorted(list_images(source))[:count] if source.exists() else []
    files = files or sorted(list_images(data / "kodak"))
    dualtoken = [sys.executable, "-c", "import sys; from dualtoken.cli.main import main; sys.exit(main())"]
    rows_encode, rows_decode = [], []
    with tempfile.TemporaryDirectory() as folder:
        inputs = Path(folder) / "inputs"
        inputs.mkdir()
        for path in files:
            (inputs / path.name).symlink_to(path.resolve())
        runs = [("eager (--backend torch --precision fp32)", ["--backend", "torch", "--precision", "fp32"], None),
                ("default (auto)", [], None)]
        if baseline is not None:
            runs.insert(0, (f"eager at {baseline[0]} (--precision fp32)", ["--precision", "fp32"], baseline[1]))
        codes = []
        for name, flags, source in runs:
            env = {**os.environ, "PYTHONPATH": str(source)} if source else None
            tokens = Path(folder) / f"{len(rows_encode)}.safetensors"
            start = time.perf_counter()
            subprocess.run(dualtoken + ["encode", str(inputs), "--out", str(tokens), *flags], check=True,
                           capture_output=True, env=env)
            rows_encode.append((name, len(files) / (time.perf_counter() - start), "whole command"))
            codes.append(load_tokens(tokens))
            start = time.perf_counter()
            subprocess.run(dualtoken + ["decode", str(tokens), "--out", str(Path(folder) / f"dec{len(rows_decode)}"),
                                        *flags], check=True, capture_output=True, env=env)
            rows_decode.append((name, len(files) / (time.perf_counter() - start), "whole command"))
        for row, file in enumerate(codes[:-1]):
            differ = [float((getattr(file, b) != getattr(codes[-1], b)).float().mean()) for b in ("pixel", "semantic")]
            rows_encode[row] = (*rows_encode[row][:2], f"whole command; codes differing from the default: pixel "
                                f"{differ[0]:.3%}, semantic {differ[1]:.3%}")
    table(f"dualtoken encode of {len(files)} photos, model load included", rows_encode, "images/s")
    table("dualtoken decode of their codes, model load included", rows_decode, "images/s")


def bench_agreement(tokenizer: DualTokenizer, data: Path, batch: int = 8) -> None:
    sets = {"Kodak-24": sorted(list_images(data / "kodak"))}
    heldout = REPO / "recipes" / "efflite0" / "heldout.tsv"
    if heldout.exists() and (data / "imagenet_samples").exists():
        sets["500 held-out"] = [Path(path) for path in sorted(labels_from_tsv(heldout)[0])][:500]
    print("\n### codes of the default against eager float32\n\n| images | pixel codes differing | semantic codes "
          "differing | largest decoded difference |\n|---|---|---|---|")
    for name, files in sets.items():
        differ = {"pixel": [0, 0], "semantic": [0, 0]}
        gap = 0.0
        for start in range(0, len(files), batch):
            images = torch.stack([load_image(p, tokenizer.image_size) for p in files[start : start + batch]])
            with torch.inference_mode():
                eager = tokenizer.encode(images, "fp32", "torch")
                fast = tokenizer.encode(images, "fp32", "onnxruntime")
                for branch in differ:
                    a, b = getattr(eager, branch), getattr(fast, branch)
                    differ[branch][0] += int((a != b).sum())
                    differ[branch][1] += a.numel()
                reference = tokenizer.decode(eager.pixel, "fp32", "torch")
                gap = max(gap, float((tokenizer.decode(eager.pixel, "fp32", "onnxruntime") - reference).abs().max()))
        print(f"| {name} ({len(files)}) | {differ['pixel'][0] / differ['pixel'][1]:.3%} | "
              f"{differ['semantic'][0] / differ['semantic'][1]:.3%} | {gap:.1e} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data")
    parser.add_argument("--only", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cli-images", type=int, default=240)
    parser.add_argument("--compile", action="store_true", help="also time torch.compile in the tower section")
    parser.add_argument("--baseline", metavar="REV", help="also run this commit's search and CLI (search, cli)")
    parser.add_argument("--search-images", type=int, default=16, help="Kodak photos whose latents the search codes")
    args = parser.parse_args()
    flags = ", ".join(f"{k} {'yes' if v else 'no'}" for k, v in cpu_bf16_flags().items())
    print(f"{cpu_name()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads, torch {torch.__version__}; "
          f"{flags}; load average {os.getloadavg()[0]:.1f} at the start")
    tokenizer = DualTokenizer.from_pretrained("dualtoken-efflite0")
    images = photos(args.data, 8)
    scratch = tempfile.TemporaryDirectory()
    baseline = (args.baseline, baseline_source(args.baseline, Path(scratch.name))) if args.baseline else None
    eager_tower = bench_tower(images, args.repeats, args.compile) if "tower" in args.only else None
    if "api" in args.only:
        bench_api(tokenizer, images, args.repeats, eager_tower)
    if "search" in args.only:
        bench_search(tokenizer, photos(args.data, args.search_images), args.repeats, baseline)
    if "cli" in args.only:
        bench_cli(args.data, args.cli_images, baseline)
    if "agreement" in args.only:
        bench_agreement(tokenizer, args.data)
    print(f"\nload average {os.getloadavg()[0]:.1f} at the end")


if __name__ == "__main__":
    main()
