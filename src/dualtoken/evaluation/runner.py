"""The evaluation loop: one pass over the data computes every metric group, at every depth k = 1..Q.

Per batch: encode once; decode with the first k pixel depths and compare with the input (PSNR, SSIM, feature
distances); pool the first k semantic depths and compare with the unquantized backbone, the teacher and a
classifier; count codes; re-encode the reconstruction for token stability (its own group, and a column of the
codebook group's per-depth usage). Per-image values are kept with the
image's data index and gathered in data order at the end, so any number of processes gives the same report.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections import defaultdict
from pathlib import Path

import torch
from tqdm import tqdm

from ..config import to_dict
from ..data import resolve_source
from ..errors import ConfigError, DataError, DualTokenError
from ..metrics import psnr, ssim
from .codebook_stats import code_histogram, codebook_report
from .config import EvalConfig
from .distributed import gather_objects, gather_rows, rank_and_world, sum_over_processes
from .distribution import frechet_metric, kernel_distance
from .extremes import ExtremeImages
from .feature_net import FeatureNet, level_distance
from .protocol import to_uint8_levels
from .samples import Batch, LabelLookup, count_images, eval_loader, find_beside
from .semantic import build_classifier, pooled_cosine, run_unquantized, token_cosine
from .zeroshot import topk_hits

EFFICIENTNET = "efficientnet_lite0"


def _prefix_agreement(first: torch.Tensor, second: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per image and depth: fraction of positions whose code agrees (B, Q), and whose codes 1..q all agree."""
    same = (first == second).flatten(1, 2).float()  # (B, h*w, Q)
    return same.mean(dim=1), same.cumprod(dim=-1).mean(dim=1)


def _fingerprint(ids: list[str], digests: torch.Tensor) -> str:
    """SHA-256 over (id, SHA-256 of the float32 input tensor) of every image in data order."""
    hasher = hashlib.sha256()
    for image_id, digest in zip(ids, digests, strict=True):
        hasher.update(image_id.encode() + b"\0" + bytes(digest.tolist()))
    return hasher.hexdigest()


class Evaluator:
    """Accumulates one process's results batch by batch; :meth:`finish` gathers them into report sections."""

    def __init__(
        self, tokenizer, config: EvalConfig, device: torch.device, classes_path: Path | None, has_labels: bool
    ) -> None:
        self.tok = tokenizer
        self.config = config
        self.device = device
        self.skipped_reasons: dict[str, str] = {}
        self.caveats: dict[str, str] = {}  # metric -> why its value needs care at this number of images
        rd = config.wants("rate_distortion")
        self.pixel_depths = list(range(1, tokenizer.pixel_depth + 1)) if rd else [tokenizer.pixel_depth]
        self.semantic_depths = list(range(1, tokenizer.semantic_depth + 1)) if rd else [tokenizer.semantic_depth]
        self.rows: dict[str, list[torch.Tensor]] = defaultdict(list)
        self.accuracy_rows: set[str] = set()
        self.kid_settings: dict | None = None
        self.tables: dict[str, set[str]] = {"pixel": set(), "semantic": set()}
        self.indices: list[torch.Tensor] = []
        self.ids: list[str] = []
        self.skipped_images: list[tuple[int, str, str]] = []  # (index, id, reason)
        self.extremes = ExtremeImages(config.grid_images)
        self.histograms = {
            branch: torch.zeros(depth, tokenizer.codebook_size(branch), dtype=torch.long)
            for branch, depth in (("pixel", tokenizer.pixel_depth), ("semantic", tokenizer.semantic_depth))
        }
        self.feature_nets = self._feature_nets()
        self.frechet = {
            (net.name, k): frechet_metric(net.feature_dim).to(device)
            for net in self.feature_nets.values()
            for k in self.pixel_depths
            if config.wants("distribution")
        }
        self.lpips = self._lpips()
        self.classifier, self.teacher = None, None
        if config.wants("semantic"):
            if has_labels:
                self.classifier, reason = build_classifier(tokenizer, config, classes_path)
            else:
                reason = "no classification: the data has no labels (labels.tsv, or cls members in shards)"
            if reason:
                self.skipped_reasons["classification"] = reason
            try:
                self.teacher = tokenizer.teacher().to(device).eval()
            except (DualTokenError, OSError) as exc:
                self.skipped_reasons["teacher"] = f"no teacher metrics: {exc}"

    # ------------------------------------------------------------------------------------------------------------
    # networks
    # ------------------------------------------------------------------------------------------------------------

    def _feature_nets(self) -> dict:
        config, nets = self.config, {}
        if config.wants("perceptual") or config.wants("distribution"):
            nets[EFFICIENTNET] = FeatureNet(config.feature_resize).to(self.device)
        if config.inception_weights and config.wants("distribution"):
            from .inception import InceptionFeatures

            nets["inception"] = InceptionFeatures(config.inception_weights).to(self.device)
        elif config.wants("distribution"):
            self.skipped_reasons["rfid"] = "rFID not computed: no Inception weights file given (inception_weights)"
        return nets

    def _lpips(self):
        if not self.config.wants("perceptual"):
            return None
        if not self.config.lpips_weights:
            self.skipped_reasons["lpips"] = "LPIPS not computed: no VGG/AlexNet weights file given (lpips_weights)"
            return None
        from .lpips import LPIPS

        return LPIPS(self.config.lpips_net, self.config.lpips_weights, self.config.lpips_lin_weights).to(self.device)

    # ------------------------------------------------------------------------------------------------------------
    # per batch
    # ------------------------------------------------------------------------------------------------------------

    def _add(self, name: str, values: torch.Tensor, table: str | None = None) -> None:
        """Store per-image values (B, ...); ``table`` ("pixel" / "semantic") makes ``name`` a rate-distortion
        column (its name ends with @k)."""
        self.rows[name].append(values.detach().float().cpu() if values.is_floating_point() else values.cpu())
        if table is not None:
            self.tables[table].add(name)

    def _add_accuracy(self, name: str, hits: torch.Tensor, table: str | None = None) -> None:
        """Per-image hits (0/1); their mean counts labelled images only."""
        self.accuracy_rows.add(name)
        self._add(name, hits, table)

    @property
    def decodes(self) -> bool:
        """Whether the pixel path runs (any group that needs reconstructions)."""
        return self.reencodes or any(self.config.wants(g) for g in ("reconstruction", "perceptual", "distribution"))

    @property
    def reencodes(self) -> bool:
        """Whether reconstructions are encoded again: token stability, its own group and a column of the codebooks."""
        return self.config.wants("stability") or self.config.wants("codebook")

    @torch.no_grad()
    def update(self, batch: Batch) -> None:
        self.skipped_images += batch.skipped
        if batch.images is None:
            return
        images = batch.images.to(self.device)
        self.indices.append(batch.indices)
        self.ids += batch.ids
        digests = [hashlib.sha256(image.float().contiguous().numpy().tobytes()).digest() for image in batch.images]
        self._add("fingerprint", torch.tensor([list(d) for d in digests], dtype=torch.uint8))
        self._add("label", batch.labels)  # -1: no label
        tokens = self.tok.encode(images)
        for branch, codes in (("pixel", tokens.pixel), ("semantic", tokens.semantic)):
            self.histograms[branch] += code_histogram(codes, self.tok.codebook_size(branch)).cpu()
        if self.decodes:
            reconstruction = self._pixel_metrics(images, tokens.pixel)
            self.extremes.offer(
                self.rows[f"psnr@{self.tok.pixel_depth}"][-1], batch.indices, batch.ids, batch.images,
                reconstruction.cpu(),
            )
        if self.reencodes:
            again = self.tok.encode(to_uint8_levels(reconstruction))
            for branch in ("pixel", "semantic"):
                per_depth, prefix = _prefix_agreement(getattr(tokens, branch), getattr(again, branch))
                self._add(f"stability_{branch}", per_depth)
                self._add(f"stability_{branch}_prefix", prefix)
        if self.config.wants("semantic"):
            self._semantic_metrics(images, tokens.semantic, batch.labels.to(self.device))

    def _pixel_metrics(self, images: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        """Metrics of the reconstructions from the first k depths; returns the full-depth reconstruction."""
        real = {name: net(images) for name, net in self.feature_nets.items()}
        for name, feats in real.items():
            pooled = feats.pooled if name == EFFICIENTNET else feats
            if self.config.wants("distribution"):
                self._add(f"features_{name}_real", pooled)
        reconstruction = None
        for k in self.pixel_depths:
            reconstruction = self.tok.decode(codes[..., :k]).float()  # (B, 3, H, W), unclamped
            self._add(f"psnr@{k}", psnr(reconstruction, images), "pixel")
            if self.config.wants("reconstruction"):
                self._add(f"ssim@{k}", ssim(reconstruction, images), "pixel")
            clamped = reconstruction.clamp(-1.0, 1.0)
            if self.lpips is not None:
                self._add(f"lpips_{self.config.lpips_net}@{k}", self.lpips(clamped, images), "pixel")
            for name, net in self.feature_nets.items():
                fake = net(clamped)
                if name == EFFICIENTNET:
                    if self.config.wants("perceptual"):
                        distance = level_distance(fake.levels, real[name].levels)
                        self._add(f"perceptual_{EFFICIENTNET}@{k}", distance, "pixel")
                    fake_pooled, real_pooled = fake.pooled, real[name].pooled
                else:
                    fake_pooled, real_pooled = fake, real[name]
                if self.config.wants("distribution"):
                    self._add(f"features_{name}@{k}", fake_pooled)
                    self.frechet[(name, k)].update(real_pooled.double(), real=True)
                    self.frechet[(name, k)].update(fake_pooled.double(), real=False)
        return reconstruction

    def _semantic_metrics(self, images: torch.Tensor, codes: torch.Tensor, labels: torch.Tensor) -> None:
        layer = self.tok.config.semantic_layer
        references = {"unquantized": run_unquantized(self.tok.backbone, images, layer)}
        if self.teacher is not None:
            references["teacher"] = run_unquantized(self.teacher, images, layer)
        classifier, top = self.classifier, self.config.top_k
        safe_labels = labels.clamp(min=0)  # unlabelled images are scored, then left out of the mean
        if classifier is not None:
            for name, reference in references.items():
                top1, topk = topk_hits(classifier.scores(reference.pooled), safe_labels, top)
                self._add_accuracy(f"{classifier.kind}_top1_{name}", top1)
                self._add_accuracy(f"{classifier.kind}_top{top}_{name}", topk)
        for k in self.semantic_depths:
            features = self.tok.semantic_features(codes[..., :k])  # (B, h*w, W)
            pooled = self.tok.pooled_embedding(codes[..., :k])  # (B, pooled_width)
            for name, reference in references.items():
                self._add(f"{name}_cosine_tokens@{k}", token_cosine(features, reference.tokens), "semantic")
                self._add(f"{name}_cosine_pooled@{k}", pooled_cosine(pooled, reference.pooled), "semantic")
            if classifier is not None:
                top1, topk = topk_hits(classifier.scores(pooled), safe_labels, top)
                self._add_accuracy(f"{classifier.kind}_top1@{k}", top1, "semantic")
                self._add_accuracy(f"{classifier.kind}_top{top}@{k}", topk, "semantic")

    # ------------------------------------------------------------------------------------------------------------
    # resuming an interrupted run
    # ------------------------------------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        """Everything accumulated so far (this process), to continue after an interruption."""
        return {
            "rows": {name: torch.cat(parts) for name, parts in self.rows.items()},
            "accuracy_rows": sorted(self.accuracy_rows),
            "tables": {table: sorted(names) for table, names in self.tables.items()},
            "indices": torch.cat(self.indices) if self.indices else torch.zeros(0, dtype=torch.long),
            "ids": list(self.ids),
            "skipped_images": list(self.skipped_images),
            "histograms": {branch: h.clone() for branch, h in self.histograms.items()},
            "frechet": {key: {n: v.cpu() for n, v in m.metric_state.items()} for key, m in self.frechet.items()},
            "extremes": (self.extremes.best, self.extremes.worst),
        }

    def load_state_dict(self, state: dict) -> None:
        self.rows = defaultdict(list, {name: [value] for name, value in state["rows"].items()})
        self.accuracy_rows = set(state["accuracy_rows"])
        self.tables = {table: set(names) for table, names in state["tables"].items()}
        self.indices = [state["indices"]]
        self.ids = list(state["ids"])
        self.skipped_images = list(state["skipped_images"])
        self.histograms = state["histograms"]
        for key, metric_state in state["frechet"].items():
            metric = self.frechet[key]
            metric.merge_state({n: v.to(self.device) for n, v in metric_state.items()})
            metric.orig_dtype = torch.float64  # what update() would have set
        self.extremes.best, self.extremes.worst = state["extremes"]

    def done(self) -> set[int]:
        """Data indices this process has already evaluated (or found unreadable)."""
        return {int(i) for part in self.indices for i in part} | {index for index, _, _ in self.skipped_images}

    # ------------------------------------------------------------------------------------------------------------
    # the end: gather and reduce
    # ------------------------------------------------------------------------------------------------------------

    def _gathered(self) -> tuple[torch.Tensor, list[str], dict[str, torch.Tensor]]:
        names = sorted(self.rows)
        local_indices = torch.cat(self.indices) if self.indices else torch.zeros(0, dtype=torch.long)
        local_rows = {name: torch.cat(self.rows[name]) for name in names}
        id_parts = gather_objects((local_indices.tolist(), self.ids))
        by_index = {i: image_id for indices, ids in id_parts for i, image_id in zip(indices, ids, strict=True)}
        indices, rows = gather_rows(local_indices, local_rows)
        return indices, [by_index[int(i)] for i in indices], rows

    def finish(self) -> dict:
        """All processes call this together; returns the result sections (identical on every process)."""
        per_process = gather_objects(sorted(self.rows))
        row_names = sorted(set().union(*per_process))
        if any(names != row_names for names in per_process):  # the same decision on every process
            raise DataError("a process evaluated no images: use fewer processes than images")
        indices, ids, rows = self._gathered()
        skipped_images = sorted(item for part in gather_objects(self.skipped_images) for item in part)
        if len(indices) == 0:
            raise DataError("no readable images were evaluated")
        labeled = (rows["label"] >= 0).double()

        def mean(name: str) -> float:
            values = rows[name].double()
            if name in self.accuracy_rows:
                return float((values * labeled).sum() / labeled.sum().clamp(min=1))
            return float(values.mean())

        pixel_rows = []
        for k in self.pixel_depths if self.decodes else []:
            row = {"depth": k}
            for name in sorted(self.tables["pixel"]):
                if name.endswith(f"@{k}"):
                    row[name[: -len(f"@{k}")]] = mean(name)
            row.update(self._distribution(rows, k, len(indices)))
            pixel_rows.append(row)
        semantic_rows = []
        if self.config.wants("semantic"):
            for k in self.semantic_depths:
                row = {"depth": k}
                for name in sorted(self.tables["semantic"]):
                    if name.endswith(f"@{k}"):
                        row[name[: -len(f"@{k}")]] = mean(name)
                semantic_rows.append(row)
        semantic_reference = {name: mean(name) for name in sorted(self.accuracy_rows) if "@" not in name}
        results = {
            "num_images": len(indices),
            "ids": ids,
            "per_image": self._per_image(ids, rows),
            "caveats": dict(self.caveats),
            "feature_nets": sorted(self.feature_nets),
            "fingerprint": _fingerprint(ids, rows["fingerprint"]),
            "pixel_rows": pixel_rows,
            "semantic_rows": semantic_rows,
            "semantic_reference": semantic_reference,
            "labeled_images": int(labeled.sum()),
            "skipped_images": skipped_images,
            "skipped_metrics": dict(self.skipped_reasons),
            "classifier": self.classifier.description if self.classifier is not None else None,
            "classifier_kind": self.classifier.kind if self.classifier is not None else None,
        }
        stability = {
            branch: [
                {
                    "depth": q + 1,
                    "agreement": float(rows[f"stability_{branch}"][:, q].double().mean()),
                    "prefix_agreement": float(rows[f"stability_{branch}_prefix"][:, q].double().mean()),
                }
                for q in range(rows[f"stability_{branch}"].shape[1])
            ]
            for branch in ("pixel", "semantic")
        } if self.reencodes else {}
        if self.config.wants("codebook"):
            results["codebooks"] = {
                branch: codebook_report(sum_over_processes(histogram), stability[branch])
                for branch, histogram in self.histograms.items()
            }
            results["histograms"] = {branch: sum_over_processes(h) for branch, h in self.histograms.items()}
        if self.config.wants("stability"):
            results["stability"] = stability
        results["best"], results["worst"] = self.extremes.gathered()
        results["kid"] = self.kid_settings
        return results

    def _per_image(self, ids: list[str], rows: dict[str, torch.Tensor]) -> list[dict]:
        """One row per image in data order: its id, PSNR and SSIM at full depth, and PSNR from each depth prefix."""
        if not self.decodes:
            return []
        full = self.pixel_depths[-1]
        table = []
        for i, image_id in enumerate(ids):
            row = {"image": image_id, "psnr": float(rows[f"psnr@{full}"][i])}
            if f"ssim@{full}" in rows:
                row["ssim"] = float(rows[f"ssim@{full}"][i])
            row.update({f"psnr@{k}": float(rows[f"psnr@{k}"][i]) for k in self.pixel_depths})
            table.append(row)
        return table

    def _distribution(self, rows: dict[str, torch.Tensor], k: int, count: int) -> dict:
        """Set-level distances at depth k: FD (torchmetrics, synced) and KID (on features in data order)."""
        out = {}
        for name in self.feature_nets:
            if (name, k) not in self.frechet:
                continue
            label = "rfid" if name == "inception" else f"fd_{name}"
            if count < 2:
                self.skipped_reasons[label] = f"{label} needs at least 2 images"
                continue
            out[label] = float(self.frechet[(name, k)].compute())
            dims = self.feature_nets[name].feature_dim
            if count <= dims:
                self.caveats[label] = (
                    f"{label} on {count} images, not more than its {dims} feature dimensions: the covariances are "
                    "singular and the distance is biased upwards; compare it only with runs on as many images"
                )
            if name == EFFICIENTNET:
                # with no more images than a subset holds, every subset is the whole set: draw it once
                subsets = self.config.kid_subsets if self.config.kid_subset_size < count else 1
                mean, std, size = kernel_distance(
                    rows[f"features_{name}_real"], rows[f"features_{name}@{k}"], subsets,
                    self.config.kid_subset_size, self.config.kid_degree, self.config.seed,
                )
                out[f"kid_{name}"] = mean
                if size < count:  # subsets drawn from more images than they hold: their spread means something
                    out[f"kid_{name}_std"] = std
                else:
                    self.caveats[f"kid_{name}"] = (
                        f"kid_{name} on {count} images, not more than kid_subset_size {self.config.kid_subset_size}:"
                        f" every subset is the whole set, so it is one estimate with no spread (no kid_{name}_std);"
                        " KID is unbiased, so values near 0 can be negative"
                    )
                self.kid_settings = {"subsets": subsets, "subset_size": size,
                                     "degree": self.config.kid_degree, "seed": self.config.seed}
        return out


def load_model(model, device: torch.device):
    """A DualTokenizer from an instance, a folder written by save_pretrained, or an embedded model's name."""
    from ..tokenizer import DualTokenizer

    tokenizer = model if isinstance(model, DualTokenizer) else DualTokenizer.from_pretrained(model)
    return tokenizer.to(device).eval()


def _signature(tokenizer, data: str | Path, config: EvalConfig) -> dict:
    """What a partial state must match to be resumed: the settings, the data and the model's weights."""
    model = hashlib.sha256(tokenizer.config.to_json().encode())
    for branch in ("pixel", "semantic"):
        model.update(tokenizer.codebook(branch).detach().float().cpu().numpy().tobytes())
    return {"config": {k: v for k, v in to_dict(config).items() if k != "num_workers"}, "data": str(data),
            "model": model.hexdigest()}


def _save_partial(path: Path, signature: dict, evaluator: Evaluator) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    torch.save({"signature": signature, "state": evaluator.state_dict()}, tmp)
    os.replace(tmp, path)


def run_evaluation(
    tokenizer, data: str | Path, config: EvalConfig, device: torch.device, progress: bool,
    partial_dir: Path | None = None,
) -> dict:
    """Evaluate ``tokenizer`` on ``data`` in this process (and its torchrun peers); the result sections.

    With ``partial_dir``, each process saves what it has accumulated there every ``config.checkpoint_every``
    batches and continues from it when started again with the same model, data and settings.
    """
    rank, world = rank_and_world()
    start = time.perf_counter()
    source = resolve_source(data)
    labels = LabelLookup(source, config.labels)
    classes = Path(config.classes) if config.classes else find_beside(source.spec, ("classes.tsv", "classes.txt"))
    evaluator = Evaluator(tokenizer, config, device, classes, labels.available)
    signature = _signature(tokenizer, data, config)
    state_path = partial_dir / f"rank{rank}-of-{world}.pt" if partial_dir is not None else None
    if state_path is not None and state_path.is_file():
        saved = torch.load(state_path, map_location="cpu", weights_only=False)
        if saved["signature"] != signature:
            raise ConfigError(
                f"{state_path} holds a partial evaluation of another model, data set or config: "
                f"delete {partial_dir} to start over"
            )
        evaluator.load_state_dict(saved["state"])
    done = evaluator.done()
    loader = eval_loader(
        source, tokenizer.image_size, labels, config.limit, config.batch_size, config.num_workers, done
    )
    total = count_images(source, config.limit)
    mine = len(range(rank, total, world)) - len(done) if total is not None else None
    with tqdm(total=mine, desc="eval", unit="img", disable=not progress or rank != 0) as bar:
        for step, batch in enumerate(loader, start=1):
            evaluator.update(batch)
            bar.update(len(batch.ids) + len(batch.skipped))
            if state_path is not None and config.checkpoint_every and step % config.checkpoint_every == 0:
                _save_partial(state_path, signature, evaluator)
    results = evaluator.finish()
    if state_path is not None:
        state_path.unlink(missing_ok=True)
    results.update(
        data_source=source.spec,
        labels_source=labels.origin,
        world_size=world,
        seconds=time.perf_counter() - start,
        pixel_depths=evaluator.pixel_depths,
        semantic_depths=evaluator.semantic_depths,
    )
    return results
