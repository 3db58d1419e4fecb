"""Where training numbers go: the console, a JSONL file and TensorBoard (rank 0 only).

``metrics.jsonl`` holds one JSON object per record: ``{"step", "kind", "time", <name>: <value>, ...}`` with kind
``train``, ``codebook``, ``eval`` or ``system``. On resume, records after the resumed step (written after the last
checkpoint of the interrupted run) are dropped, so the file reads as one uninterrupted run.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from .config import LogConfig


def _format(value: float) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


class MetricsLogger:
    """Console + JSONL + TensorBoard sinks, each switched by :class:`LogConfig`; a no-op off rank 0."""

    def __init__(
        self, out_dir: str | Path, config: LogConfig, enabled: bool = True, resume_step: int = 0
    ) -> None:
        self.config = config
        self.enabled = enabled
        self.jsonl_path = Path(out_dir) / "metrics.jsonl"
        self.writer = None
        if not enabled:
            return
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        if config.jsonl:
            self._truncate_after(resume_step)
        if config.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(
                str(Path(out_dir) / "tensorboard"), purge_step=resume_step + 1 if resume_step else None
            )

    def _truncate_after(self, step: int) -> None:
        if not self.jsonl_path.is_file():
            return
        kept = [
            line
            for line in self.jsonl_path.read_text().splitlines()
            if line and json.loads(line)["step"] <= step
        ]
        tmp = self.jsonl_path.with_name(f".{self.jsonl_path.name}.tmp{os.getpid()}")
        tmp.write_text("".join(f"{line}\n" for line in kept))
        os.replace(tmp, self.jsonl_path)

    def log(self, step: int, values: dict[str, float], kind: str = "train") -> None:
        if not self.enabled:
            return
        if self.config.jsonl:
            record = {"step": step, "kind": kind, "time": round(time.time(), 3), **values}
            with open(self.jsonl_path, "a") as handle:
                handle.write(json.dumps(record) + "\n")
        if self.writer is not None:
            for name, value in values.items():
                self.writer.add_scalar(f"{kind}/{name}", value, step)
        if self.config.console:
            text = " ".join(f"{name}={_format(value)}" for name, value in values.items())
            tqdm.write(f"[{kind} {step}] {text}")

    def image(self, step: int, tag: str, image: np.ndarray) -> None:
        """A uint8 (H, W, 3) picture to TensorBoard."""
        if self.enabled and self.writer is not None:
            self.writer.add_image(tag, image, step, dataformats="HWC")

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
