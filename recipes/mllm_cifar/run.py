"""The unified MLLM at small scale on CIFAR-10, on CPU: understanding and generation with both vocabularies.

Stages (each resumable; ``all`` runs them in order), every number in ``config.json`` (override with --set):

    prepare   CIFAR-10 shards -> PNGs -> token cache (dualtoken.data.tokenize.encode_dataset, what `dualtoken
              encode` runs) -> LLaVA conversations ("What is in this image?" -> "It is a horse." / "It is an
              airplane."), captions ("Draw a horse."), a byte-level BPE trained here
    train     one small LLM from scratch per input mode (semantic+pixel, semantic only, pixel only), same data
              (understanding and generation mixed), same steps; its config is written to train_<mode>.json
    evaluate  answer accuracy on the test images per input mode, next to a linear probe on the same tokens;
              "Draw a {class}." with and without classifier-free guidance, judged by an independent classifier
              (logistic regression on EfficientNet-Lite0 features of the real training images, no tokenizer in it)
              and by a Fréchet distance on the same features against the real test images; a PNG grid of samples
              per class; results.json + results.md

    python recipes/mllm_cifar/run.py all --config recipes/mllm_cifar/config.json

Relative paths in a recipe file (``data``, ``work``, ``tokenizer`` when it is a folder there) are taken from the
file's folder, as in every config file, so the recipe runs the same from any working directory; ``--set`` values
are command-line paths, taken from the working directory.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from dualtoken import DualTokenizer
from dualtoken.config import apply_overrides, load_config_file, to_dict
from dualtoken.data.tokenize import encode_dataset
from dualtoken.errors import ConfigError, DataError, DualTokenError
from dualtoken.evaluation.distribution import frechet_distance
from dualtoken.features import EfficientNetFeatures
from dualtoken.io import UpscaledImageWarning, load_image, save_image, to_uint8
from dualtoken.metrics import bootstrap_mean
from dualtoken.mllm import (
    DepthHeadConfig,
    DualTokenMLLM,
    LLMConfig,
    MLLMConfig,
    MLLMDataConfig,
    MLLMTrainConfig,
    SamplingConfig,
    answer,
    generate_images,
)
from dualtoken.mllm.data import TokenCache
from dualtoken.mllm.text_tokenizer import train_bpe_tokenizer
from dualtoken.mllm.train import train_mllm
from dualtoken.precision import set_inference_precision
from dualtoken.tokenizer_pair import TokenizerPair, is_tokenizer_pair, load_visual_tokenizer
from dualtoken.training.config import CheckpointConfig, LogConfig, OptimizerConfig
from dualtoken.visualize import labelled_grid

MODES = ("both", "semantic", "pixel")
QUESTION = "What is in this image?"


@dataclass
class RecipeConfig:
    """The whole demonstration. In a recipe file, relative paths are taken from the file's folder
    (:func:`load_recipe`)."""

    path_fields: ClassVar[tuple[str, ...]] = ("data", "work")
    name_or_path_fields: ClassVar[tuple[str, ...]] = ("tokenizer",)

    tokenizer: str = "dualtoken-efflite0"  # an embedded DualToken model's name, a folder, or a tokenizer pair folder
    # tokenize at this size (convolutional tokenizers only): 128 px gives 8x8 positions, a 4x shorter sequence
    # than the default model's 256 px; None keeps the tokenizer's own size
    image_size: int | None = 128
    # the tokenizer's and the MLLM training's precision (dualtoken.precision): "auto" is bf16 autocast on a CPU with
    # bf16 matrix units and float32 elsewhere, so its figures depend on the CPU; "fp32" gives the same on every CPU
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    data: str = "../shared/data/cifar10"
    work: str = "runs/mllm_cifar"
    train_limit: int | None = None  # first N training images (None = all 7,500)
    test_limit: int | None = None  # first N test images (None = all 10,000)
    encode_batch_size: int = 64
    text_vocab: int = 512
    llm: dict[str, Any] = field(
        default_factory=lambda: {
            "model_type": "llama",
            "hidden_size": 192,
            "intermediate_size": 512,
            "num_hidden_layers": 4,
            "num_attention_heads": 4,
            "num_key_value_heads": 4,
            "max_position_embeddings": 1024,
            "tie_word_embeddings": True,
        }
    )
    heads: DepthHeadConfig = field(
        default_factory=lambda: DepthHeadConfig(layers=2, width=128, num_heads=4, mlp_ratio=2.0)
    )
    # top-k off: with 1024-code books the release's top-k 900 filters next to nothing and costs a topk per depth
    sampling: SamplingConfig = field(default_factory=lambda: SamplingConfig(top_k=0, max_new_tokens=16))
    modes: tuple[Literal["both", "semantic", "pixel"], ...] = MODES
    # the first N residual depths of each vocabulary the MLLMs read (MLLMConfig.pixel_depths / semantic_depths);
    # None = all of the tokenizer's (4 pixel, 8 semantic for dualtoken-efflite0)
    pixel_depths: int | None = None
    semantic_depths: int | None = None
    # the first N of those they predict when they draw (MLLMConfig.predict_*_depths); None = the depths they read
    predict_pixel_depths: int | None = None
    predict_semantic_depths: int | None = None
    steps: int = 1000
    max_seconds: float = 0.0  # a wall-clock budget per training run (0: none); a run cut by it ends as if finished
    export_every: int = 0  # also write runs/<mode>/export-<step> every so many steps (0: only final)
    # which folder of each run ``evaluate`` reads: "final", or an export such as "export-00000300"
    evaluate_export: str = "final"
    batch_size: int = 8
    optim: OptimizerConfig = field(
        default_factory=lambda: OptimizerConfig(
            lr=1e-3, betas=(0.9, 0.999), weight_decay=0.01, warmup_steps=60, grad_clip=1.0
        )
    )
    condition_dropout: float = 0.1
    seed: int = 0
    eval_batch_size: int = 100
    probe_steps: int = 100  # L-BFGS iterations of the linear probes
    probe_weight_decay: float = 1e-3
    samples_per_class: int = 20  # generated images per class and guidance setting
    guidance_scales: tuple[float, ...] = (1.0, 3.0)  # classifier-free guidance scales compared; 1 = none
    # the input modes whose models draw (each of them must be in ``modes``); results keys of modes other than
    # "both" are prefixed with the mode ("pixel_cfg_3")
    generation_modes: tuple[Literal["both", "semantic", "pixel"], ...] = ("both",)
    judge_train_images: int | None = None  # the first N training images train the judge of drawings (None = all)
    grid_columns: int = 10
    comparison_columns: int = 3  # samples per class and scale in samples_by_guidance.png


# ----------------------------------------------------------------------------------------------------------------
# prepare
# ----------------------------------------------------------------------------------------------------------------


def load_recipe(path: str | Path, overrides: list[str]) -> RecipeConfig:
    """A recipe file (its relative paths taken from its folder), then ``--set`` overrides (from the working
    directory); a missing or malformed file is a ConfigError naming it."""
    return apply_overrides(load_config_file(RecipeConfig, path, "recipe file"), overrides)


def class_names(cfg: RecipeConfig) -> list[str]:
    """The ten class names of ``<data>/classes.txt``; a DataError naming the path when the data is not there."""
    path = Path(cfg.data) / "classes.txt"
    if not path.is_file():
        raise DataError(
            f"no CIFAR-10 data at {Path(cfg.data).resolve()}: expected classes.txt and {{train,test}}-*.tar.gz there "
            "(../shared/data/cifar10 beside the repository; `data` in a recipe file is taken from the file's folder, "
            "with --set from the working directory)"
        )
    return path.read_text().split()


def with_article(noun: str) -> str:
    """'a horse', 'an airplane': the indefinite article by the noun's first letter (enough for CIFAR-10)."""
    return f"{'an' if noun[0].lower() in 'aeiou' else 'a'} {noun}"


def extract_split(cfg: RecipeConfig, split: str, limit: int | None, out: Path) -> dict[str, int]:
    """The first ``limit`` images of a split as PNGs in ``out``; returns {image id: class}."""
    import webdataset as wds

    labels_path = out / "labels.json"
    if labels_path.is_file():
        return json.loads(labels_path.read_text())
    out.mkdir(parents=True, exist_ok=True)
    urls = sorted(str(p) for p in Path(cfg.data).glob(f"{split}-*.tar.gz"))
    labels = {}
    for sample in wds.WebDataset(urls, shardshuffle=False, empty_check=False):
        if limit is not None and len(labels) == limit:
            break
        Image.open(io.BytesIO(sample["png"])).save(out / f"{sample['__key__']}.png")
        labels[sample["__key__"]] = int(sample["cls"])
    labels_path.write_text(json.dumps(labels))
    return labels


def visual_tokenizer(cfg: RecipeConfig) -> tuple[DualTokenizer | TokenizerPair, str]:
    """The tokenizer at the recipe's image size and a reference to it for the MLLM configs (a name or a folder;
    a resized tokenizer is written once to ``<work>/tokenizer``)."""
    tokenizer = load_visual_tokenizer(cfg.tokenizer)
    if cfg.image_size is None or tokenizer.image_size == (cfg.image_size, cfg.image_size):
        reference = str(Path(cfg.tokenizer).resolve()) if Path(cfg.tokenizer).is_dir() else cfg.tokenizer
        return tokenizer, reference
    folder = Path(cfg.work) / "tokenizer"
    if not (folder / "model.safetensors").is_file() and not is_tokenizer_pair(folder):
        tokenizer.at_resolution(cfg.image_size).save_pretrained(folder)
    return load_visual_tokenizer(folder), str(folder.resolve())


def prepare(cfg: RecipeConfig) -> None:
    work = Path(cfg.work)
    names = class_names(cfg)
    tokenizer, tokenizer_ref = visual_tokenizer(cfg)
    labels = {}
    for split, limit in (("train", cfg.train_limit), ("test", cfg.test_limit)):
        labels[split] = extract_split(cfg, split, limit, work / "images" / split)
        encode_dataset(
            tokenizer,
            str(work / "images" / split),
            str(work / "tokens" / split),
            batch_size=cfg.encode_batch_size,
        )
    conversations = [
        {
            "id": key,
            "image": f"{key}.png",
            "conversations": [
                {"from": "human", "value": f"<image>\n{QUESTION}"},
                {"from": "gpt", "value": f"It is {with_article(names[label])}."},
            ],
        }
        for key, label in labels["train"].items()
    ]
    (work / "conversations.json").write_text(json.dumps(conversations))
    captions = [
        {"file": f"{key}.png", "caption": f"Draw {with_article(names[label])}."} for key, label in labels["train"].items()
    ]
    (work / "captions.jsonl").write_text("".join(json.dumps(c) + "\n" for c in captions))

    prompt = MLLMConfig().prompt
    template = prompt.user_prefix + QUESTION + prompt.user_suffix + prompt.assistant_prefix
    texts = [template + f"It is {with_article(n)}." + prompt.assistant_suffix + f"Draw {with_article(n)}." for n in names]
    train_bpe_tokenizer(texts * 20, cfg.text_vocab, work / "text_tokenizer", prompt)
    print(f"prepared {work}: {len(labels['train'])} train / {len(labels['test'])} test images")


# ----------------------------------------------------------------------------------------------------------------
# train
# ----------------------------------------------------------------------------------------------------------------


def train_config(cfg: RecipeConfig, mode: str, tokenizer_ref: str, text_vocab_size: int) -> MLLMTrainConfig:
    """The MLLM training config of one input mode, from the recipe, the visual tokenizer's reference and the size
    of the text tokenizer ``prepare`` trained."""
    work = Path(cfg.work)
    model = MLLMConfig(
        tokenizer=tokenizer_ref,
        llm=LLMConfig(architecture={**cfg.llm, "vocab_size": text_vocab_size}, text_tokenizer="text_tokenizer"),
        fusion=dataclasses.replace(MLLMConfig().fusion, inputs=mode),
        heads=cfg.heads,
        sampling=cfg.sampling,
        pixel_depths=cfg.pixel_depths,
        semantic_depths=cfg.semantic_depths,
        predict_pixel_depths=cfg.predict_pixel_depths,
        predict_semantic_depths=cfg.predict_semantic_depths,
    )
    return MLLMTrainConfig(
        model=model,
        data=MLLMDataConfig(
            token_cache=("tokens/train",),
            conversations=("conversations.json",),
            captions=("captions.jsonl",),
            condition_dropout=cfg.condition_dropout,
            batch_size=cfg.batch_size,
        ),
        optimizer=cfg.optim,
        max_steps=cfg.steps,
        max_seconds=cfg.max_seconds,
        seed=cfg.seed,
        precision=cfg.precision,
        output_dir=str((work / "runs" / mode).resolve()),
        log=LogConfig(every=max(1, cfg.steps // 100), console=False),
        checkpoint=CheckpointConfig(every=max(1, cfg.steps // 10), keep_last=2, export_every=cfg.export_every),
    )


def train(cfg: RecipeConfig) -> None:
    """Train one MLLM per input mode; each config is also written to ``<work>/train_<mode>.json`` (for
    ``dualtoken train-mllm --config``), so overrides given to this stage take effect."""
    from transformers import PreTrainedTokenizerFast

    work = Path(cfg.work)
    tokenizer_ref = visual_tokenizer(cfg)[1]
    text_vocab_size = len(PreTrainedTokenizerFast.from_pretrained(str(work / "text_tokenizer")))
    for mode in cfg.modes:
        config = train_config(cfg, mode, tokenizer_ref, text_vocab_size)
        (work / f"train_{mode}.json").write_text(json.dumps(to_dict(config), indent=2) + "\n")
        start = time.perf_counter()
        train_mllm(config, base_dir=work)
        print(f"trained {mode} in {time.perf_counter() - start:.0f} s")


# ----------------------------------------------------------------------------------------------------------------
# evaluate
# ----------------------------------------------------------------------------------------------------------------


def token_features(
    tokenizer: DualTokenizer | TokenizerPair, pixel: torch.Tensor, semantic: torch.Tensor, mode: str
) -> torch.Tensor:
    """The linear probe's input: per position, the depth-summed code vectors of the mode's vocabularies,
    flattened (B, h·w·D·branches)."""
    parts = []
    for branch, codes in (("pixel", pixel), ("semantic", semantic)):
        if mode in ("both", branch):
            parts.append(tokenizer.code_embeddings(codes, branch, per_depth=False).flatten(1))
    return torch.cat(parts, dim=1)


class LinearProbe:
    """Multinomial logistic regression on standardised features, fitted full-batch with L-BFGS."""

    def __init__(
        self, features: torch.Tensor, labels: torch.Tensor, classes: int, steps: int, decay: float
    ) -> None:
        self.mean, self.std = features.mean(0), features.std(0) + 1e-6
        x = (features - self.mean) / self.std
        self.linear = torch.nn.Linear(x.shape[1], classes)
        optimizer = torch.optim.LBFGS(self.linear.parameters(), max_iter=steps, line_search_fn="strong_wolfe")

        def closure():
            optimizer.zero_grad()
            loss = torch.nn.functional.cross_entropy(self.linear(x), labels)
            loss = loss + decay * self.linear.weight.square().sum()
            loss.backward()
            return loss

        optimizer.step(closure)

    @torch.no_grad()
    def predict(self, features: torch.Tensor) -> torch.Tensor:
        return self.linear((features - self.mean) / self.std).argmax(-1)


def real_features(work: Path, cfg: RecipeConfig, split: str, ids: list[str], size: tuple[int, int]) -> torch.Tensor:
    """EfficientNet-Lite0 features of the real images ``ids`` of ``split`` at ``size``, kept in
    ``<work>/features_<split>_<count>_<H>x<W>.pt`` for the next evaluation (ids are always a split's first images)."""
    cached = work / f"features_{split}_{len(ids)}_{size[0]}x{size[1]}.pt"
    if cached.is_file():
        return torch.load(cached)
    images = torch.stack([load_image(work / "images" / split / f"{i}.png", size) for i in ids])
    features = image_features(EfficientNetFeatures(), images, cfg.eval_batch_size, f"real {split}")
    torch.save(features, cached)
    return features


def judge(work: Path, cfg: RecipeConfig, size: tuple[int, int]) -> LinearProbe:
    """The independent judge of drawn images: logistic regression on EfficientNet-Lite0 features of the first
    ``cfg.judge_train_images`` real training images at ``size`` (no tokenizer and no MLLM in it, so no model judges
    its own drawings)."""
    labels = json.loads((work / "images" / "train" / "labels.json").read_text())
    ids = sorted(labels)[: cfg.judge_train_images]
    features = real_features(work, cfg, "train", ids, size)
    targets = torch.tensor([labels[i] for i in ids])
    return LinearProbe(features, targets, 10, cfg.probe_steps, cfg.probe_weight_decay)


def parse_answer(text: str, names: list[str]) -> int:
    """The class named in an answer (the first one mentioned), or -1."""
    found = [(text.find(n), i) for i, n in enumerate(names) if n in text]
    return min(found)[1] if found else -1


def load_split(work: Path, split: str) -> tuple[list[str], torch.Tensor, torch.Tensor, torch.Tensor]:
    labels = json.loads((work / "images" / split / "labels.json").read_text())
    ids = sorted(labels)
    pixel, semantic = TokenCache([work / "tokens" / split]).codes(ids)
    return ids, pixel, semantic, torch.tensor([labels[i] for i in ids])


def image_features(net: EfficientNetFeatures, images: torch.Tensor, batch: int, desc: str) -> torch.Tensor:
    starts = tqdm(range(0, len(images), batch), desc=f"features ({desc})")
    return torch.cat([net(images[i : i + batch]) for i in starts])


def evaluate(cfg: RecipeConfig) -> dict:
    missing = [m for m in cfg.generation_modes if m not in cfg.modes]
    if missing:
        raise ConfigError(f"generation_modes {missing} are not among the trained modes {list(cfg.modes)}")
    torch.manual_seed(cfg.seed)
    work = Path(cfg.work)
    names = class_names(cfg)
    tokenizer, _ = visual_tokenizer(cfg)
    _, train_pixel, train_semantic, train_labels = load_split(work, "train")
    test_ids, test_pixel, test_semantic, test_labels = load_split(work, "test")
    # the linear probes read the depths the MLLMs read
    train_pixel, test_pixel = train_pixel[..., : cfg.pixel_depths], test_pixel[..., : cfg.pixel_depths]
    train_semantic, test_semantic = train_semantic[..., : cfg.semantic_depths], test_semantic[..., : cfg.semantic_depths]
    results: dict[str, Any] = {
        "train_images": len(train_labels),
        "test_images": len(test_labels),
        "understanding": {},
    }

    # per image, for intervals (recipes/mllm_cifar/pair_study.py): answers right or wrong, drawn images' features
    per_image: dict[str, Any] = {"test_labels": test_labels, "understanding": {}, "generation": {}}
    probes = {}
    for mode in cfg.modes:
        probe = LinearProbe(
            token_features(tokenizer, train_pixel, train_semantic, mode),
            train_labels,
            len(names),
            cfg.probe_steps,
            cfg.probe_weight_decay,
        )
        probes[mode] = probe
        probe_accuracy = (
            probe.predict(token_features(tokenizer, test_pixel, test_semantic, mode)) == test_labels
        )
        model = DualTokenMLLM.from_pretrained(work / "runs" / mode / cfg.evaluate_export)
        predictions, exact = [], 0
        for start in tqdm(range(0, len(test_ids), cfg.eval_batch_size), desc=f"answer ({mode})"):
            rows = slice(start, start + cfg.eval_batch_size)
            texts = answer(model, [QUESTION] * len(test_ids[rows]), (test_pixel[rows], test_semantic[rows]))
            predictions += [parse_answer(t, names) for t in texts]
            exact += sum(t == f"It is {with_article(names[int(y)])}." for t, y in zip(texts, test_labels[rows]))
        correct = torch.tensor(predictions) == test_labels
        per_image["understanding"][mode] = correct
        results["understanding"][mode] = {
            "mllm_accuracy": float(correct.float().mean()),
            "mllm_accuracy_interval_95": wilson_interval(int(correct.sum()), len(correct)),
            "exact_answers": exact / len(test_ids),
            "linear_probe_accuracy": float(probe_accuracy.float().mean()),
        }

    # the modes against each other on the same images: paired bootstrap intervals of the differences in answers
    modes = list(per_image["understanding"])
    results["understanding_differences"] = {
        f"{a} - {b}": bootstrap_mean(per_image["understanding"][a].double() - per_image["understanding"][b].double())
        for i, a in enumerate(modes) for b in modes[i + 1 :]
    }

    # generation, with the semantic+pixel model; judged on the decoded images
    features = EfficientNetFeatures()
    test_features = real_features(work, cfg, "test", test_ids, tokenizer.image_size)
    per_image["real_test_features"] = test_features
    train_ids = sorted(json.loads((work / "images" / "train" / "labels.json").read_text()))
    reference_count = min(len(train_ids), cfg.samples_per_class * len(names))
    reference = real_features(work, cfg, "train", train_ids[:reference_count], tokenizer.image_size)
    results["generation"] = {
        "reference_real_train_images": {
            "images": reference_count,
            "frechet_efficientnet_lite0": frechet_distance(test_features, reference),
        }
    }
    referee = judge(work, cfg, tokenizer.image_size)
    results["generation"]["judge_on_real_test_images"] = float(
        (referee.predict(test_features) == test_labels).float().mean()
    )
    grids = []
    for generation_mode in cfg.generation_modes:
        grids += draw(cfg, generation_mode, referee, features, test_features, results, per_image)
    results["generation"]["grids"] = grids
    torch.save(per_image, work / "per_image.pt")
    (work / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (work / "results.md").write_text(render(results))
    print(render(results))
    return results


def draw(
    cfg: RecipeConfig,
    mode: str,
    referee: LinearProbe,
    features: EfficientNetFeatures,
    test_features: torch.Tensor,
    results: dict[str, Any],
    per_image: dict[str, Any],
) -> list[str]:
    """The prompts "Draw a {class}." drawn by the ``mode`` model at every guidance scale: the images judged by the
    independent ``referee`` (:func:`judge`) and by the Fréchet distance to the real test images; a labelled grid per scale and one side by side. Fills ``results`` and ``per_image``;
    returns the grids."""
    work, names = Path(cfg.work), class_names(cfg)
    model = DualTokenMLLM.from_pretrained(work / "runs" / mode / cfg.evaluate_export)
    prefix = "" if mode == "both" else f"{mode}_"
    grids, cells_by_scale, footers = [], [], []
    for scale in cfg.guidance_scales:
        requested = torch.arange(len(names)).repeat_interleave(cfg.samples_per_class)
        images = []
        starts = range(0, len(requested), cfg.eval_batch_size)
        for chunk, start in enumerate(tqdm(starts, desc=f"generate (guidance {scale:g})")):
            prompts = [f"Draw {with_article(names[int(c)])}." for c in requested[start : start + cfg.eval_batch_size]]
            out = generate_images(model, prompts, cfg_scale=scale, seed=cfg.seed + chunk)
            images.append(out.images.clamp(-1, 1))
        images = torch.cat(images)
        key = prefix + ("without_cfg" if scale == 1.0 else f"cfg_{scale:g}")
        drawn_features = image_features(features, images, cfg.eval_batch_size, "generated")
        hits = int((referee.predict(drawn_features) == requested).sum())
        per_image["generation"][key] = {"requested": requested, "features": drawn_features}
        results["generation"][key] = {
            "images": len(images),
            "requested_class_accuracy": hits / len(images),
            "requested_class_interval_95": wilson_interval(hits, len(images)),
            "frechet_efficientnet_lite0": frechet_distance(test_features, drawn_features),
        }
        cells = [[to_uint8(img) for img in images[requested == c][: cfg.grid_columns]] for c in range(len(names))]
        cells_by_scale.append(cells)
        footers.append(f"{scale:g}: {hits}/{len(images)}")
        judged_text = f"; the requested class in {hits} of {len(images)} (independent judge)"
        grid = work / f"samples_{key}.png"
        save_image(
            labelled_grid(
                cells,
                [f"Draw {with_article(name)}." for name in names],
                [f"sample {i + 1}" for i in range(max(len(row) for row in cells))],
                footer=f"guidance {scale:g}" + (" (none)" if scale == 1.0 else "") + judged_text,
                gap=2,
                font_size=11,
            ),
            grid,
        )
        grids.append(str(grid))
    comparison = work / f"{prefix}samples_by_guidance.png"
    footer = "requested class by guidance scale (independent judge): " + ", ".join(footers)
    save_image(
        guidance_comparison(cells_by_scale, cfg.guidance_scales, names, cfg.comparison_columns, footer),
        comparison,
    )
    return [*grids, str(comparison)]


def guidance_comparison(
    cells_by_scale: list[list[list[np.ndarray]]],
    scales: tuple[float, ...],
    names: list[str],
    columns: int,
    footer: str,
) -> np.ndarray:
    """One labelled grid of the samples side by side: a row per requested class, the first ``columns`` samples of
    each guidance scale next to each other (the same seeds at every scale), the scale above each column."""
    columns = min(columns, *(len(row) for cells in cells_by_scale for row in cells))
    rows = [[cell for cells in cells_by_scale for cell in cells[c][:columns]] for c in range(len(names))]
    labels = [f"guidance {s:g}" for s in scales for _ in range(columns)]
    return labelled_grid(
        rows, [f"Draw {with_article(n)}." for n in names], labels, footer=footer, gap=2, font_size=11
    )


def wilson_interval(hits: int, total: int, z: float = 1.96) -> list[float]:
    """The 95 % Wilson score interval of a binomial rate: how far ``hits / total`` can be trusted."""
    rate, spread = hits / total, z * z / total
    centre = (rate + spread / 2) / (1 + spread)
    half = z * (rate * (1 - rate) / total + spread / (4 * total)) ** 0.5 / (1 + spread)
    return [centre - half, centre + half]


def render(results: dict) -> str:
    lines = [
        f"CIFAR-10: {results['train_images']} training images, {results['test_images']} test images.",
        "",
        "| input | MLLM answer accuracy, 95 % interval | exact answers | linear probe on the same tokens |",
        "|---|---|---|---|",
    ]
    labels = {"both": "semantic + pixel", "semantic": "semantic only", "pixel": "pixel only"}
    for mode, row in results["understanding"].items():
        low, high = row["mllm_accuracy_interval_95"]
        lines.append(
            f"| {labels[mode]} | {row['mllm_accuracy']:.1%} ({low:.1%} to {high:.1%}) | {row['exact_answers']:.1%} | "
            f"{row['linear_probe_accuracy']:.1%} |"
        )
    differences = results.get("understanding_differences", {})
    if differences:
        lines += ["", "| answers, paired on the same test images | difference | 95 % interval (paired bootstrap) |",
                  "|---|---|---|"]
        for pair, row in differences.items():
            a, b = pair.split(" - ")
            lines.append(f"| {labels[a]} - {labels[b]} | {row['mean']:+.1%} | {row['low']:+.1%} to {row['high']:+.1%} |")
    lines += [
        "",
        "| generation | images | requested class (independent judge), 95 % interval | Fréchet distance "
        "(EfficientNet-Lite0) |",
        "|---|---|---|---|",
    ]
    for key, row in results["generation"].items():
        if not isinstance(row, dict):  # the grids, the judge's own accuracy
            continue
        accuracy, interval = row.get("requested_class_accuracy"), row.get("requested_class_interval_95")
        judged = "-" if accuracy is None else f"{accuracy:.1%}"
        if interval is not None:
            judged += f" ({interval[0]:.1%} to {interval[1]:.1%})"
        lines.append(
            f"| {key.replace('_', ' ')} | {row['images']} | {judged} | "
            f"{row['frechet_efficientnet_lite0']:.2f} |"
        )
    judge_accuracy = results["generation"]["judge_on_real_test_images"]
    lines += ["", f"The judge names the class of {judge_accuracy:.1%} of the real test images (its ceiling)."]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("stage", choices=("prepare", "train", "evaluate", "all"))
    parser.add_argument("--config", default=str(Path(__file__).with_name("config.json")))
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    try:
        cfg = load_recipe(args.config, args.set)
        class_names(cfg)  # the data is there, before anything is written
        set_inference_precision(cfg.precision)  # every encode and decode of the stages
        Path(cfg.work).mkdir(parents=True, exist_ok=True)
        # CIFAR-10's 32 px images are enlarged to the tokenizer's size on purpose: said once here, not once per image
        warnings.filterwarnings("ignore", category=UpscaledImageWarning)
        print("note: CIFAR-10's 32x32 images are upscaled to the tokenizer's input size (image_size)")
        (Path(cfg.work) / "recipe_config.json").write_text(json.dumps(to_dict(cfg), indent=2) + "\n")
        for stage, run in (("prepare", prepare), ("train", train), ("evaluate", evaluate)):
            if args.stage in (stage, "all"):
                run(cfg)
    except DualTokenError as error:
        print(f"run.py: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
