"""Configs of the unified MLLM (docs/METHOD.md "The unified MLLM"): the wrapped LLM, the prompt template, input fusion, visual heads,
loss weights, sampling, and training. Every number lives here; all of them round-trip to JSON and reject unknown
keys through :mod:`dualtoken.config`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal, TypeVar

from ..config import load_config_file, resolve_name_or_path, to_dict
from ..errors import ConfigError
from ..training.config import CheckpointConfig, LogConfig, OptimizerConfig

T = TypeVar("T")


@dataclass
class LLMConfig:
    """The decoder-only language model: a local transformers folder, or an architecture built at random."""

    # a local folder in save_pretrained format (any AutoModelForCausalLM: Llama, Qwen2, ...)
    path: str | None = None
    # or a transformers config as a dict (with "model_type"), randomly initialised
    architecture: dict[str, Any] | None = None
    # folder of the text tokenizer (AutoTokenizer); defaults to ``path``
    text_tokenizer: str | None = None
    attn_implementation: str = "sdpa"
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"

    def __post_init__(self) -> None:
        if (self.path is None) == (self.architecture is None):
            raise ConfigError(
                "LLMConfig: give exactly one of `path` (a local folder) or `architecture` (a config dict)"
            )
        if self.architecture is not None and "model_type" not in self.architecture:
            raise ConfigError("LLMConfig.architecture needs a 'model_type' key (e.g. 'llama', 'qwen2')")
        if self.path is None and self.text_tokenizer is None:
            raise ConfigError(
                "LLMConfig.text_tokenizer is required when the LLM is built from `architecture`"
            )


@dataclass
class PromptConfig:
    """A fixed chat template (literal strings around each turn, LLaVA style) and the image markers.

    The defaults are ChatML (Qwen2). Markers that the text tokenizer does not know are added as special tokens;
    their new embeddings start at the mean of the existing rows.
    """

    system: str = ""  # text placed before the first turn, verbatim
    user_prefix: str = "<|im_start|>user\n"
    user_suffix: str = "<|im_end|>\n"
    assistant_prefix: str = "<|im_start|>assistant\n"
    assistant_suffix: str = "<|im_end|>\n"
    image_placeholder: str = "<image>"  # where an image goes in a user message
    image_start: str = "<image_start>"  # understanding images: <image_start> v_1 .. v_N <image_end>
    image_end: str = "<image_end>"
    image_gen_start: str = (
        "<image_gen_start>"  # generated images: <image_gen_start> v_1 .. v_N <image_gen_end>
    )
    image_gen_end: str = "<image_gen_end>"
    image_slot: str = "<image_slot>"  # the token at each visual position (its embedding is replaced)
    blank_prompt: str = " "  # the unconditional user message (classifier-free guidance)

    def __post_init__(self) -> None:
        if not self.assistant_suffix.strip():
            raise ConfigError("PromptConfig.assistant_suffix must contain visible text: it ends an answer")
        markers = [
            self.image_start,
            self.image_end,
            self.image_gen_start,
            self.image_gen_end,
            self.image_slot,
        ]
        if len(set(markers)) != len(markers) or not all(markers):
            raise ConfigError(
                f"PromptConfig: the image markers must be distinct non-empty strings, got {markers}"
            )

    @property
    def special_tokens(self) -> list[str]:
        return [self.image_start, self.image_end, self.image_gen_start, self.image_gen_end, self.image_slot]


@dataclass
class FusionConfig:
    """Understanding input: per grid position, summed code embeddings -> 2-layer MLP(s) -> one LLM input vector."""

    # which vocabularies feed the LLM (the pixel-only and semantic-only modes are the paper's ablation)
    inputs: Literal["both", "pixel", "semantic"] = "both"
    # "per_branch": each vocabulary its own MLP to half the LLM width, then concatenation (the paper's method text);
    # "concat_first": concatenate the two code sums, then one MLP (the appendix's parameter count)
    order: Literal["per_branch", "concat_first"] = "per_branch"
    hidden_width: int | None = None  # the MLPs' inner width; None = their output width
    train_code_embeddings: bool = (
        False  # the code tables start as the tokenizer's codebooks, frozen by default
    )

    def __post_init__(self) -> None:
        if self.hidden_width is not None and self.hidden_width < 1:
            raise ConfigError(f"FusionConfig.hidden_width must be >= 1, got {self.hidden_width}")


@dataclass
class DepthHeadConfig:
    """A visual head (one per vocabulary): gen projector + causal depth transformer + one classifier per depth."""

    layers: int = 3
    width: int | None = None  # None = the LLM's hidden size
    num_heads: int = 16
    mlp_ratio: float = 4.0
    dropout: float = 0.1
    # "per_depth": a K x width weight matrix per depth (VILA-U's heads); "code_table": a width -> code_dim map per
    # depth, scored against the code vectors themselves (the MLLM's code table), so K costs no weights: what makes
    # an 8 x 16,384-code semantic vocabulary cheap to train
    classifier: Literal["per_depth", "code_table"] = "per_depth"

    def __post_init__(self) -> None:
        if self.layers < 1 or self.num_heads < 1:
            raise ConfigError(
                f"DepthHeadConfig: layers and num_heads must be >= 1, got {self.layers}, {self.num_heads}"
            )
        if self.width is not None and self.width % self.num_heads:
            raise ConfigError(
                f"DepthHeadConfig.width {self.width} is not a multiple of num_heads {self.num_heads}"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"DepthHeadConfig.dropout must be in [0, 1), got {self.dropout}")


@dataclass
class LossConfig:
    """L = text·CE_text + pixel·CE_pixel + semantic·CE_semantic, each a mean over its own targets."""

    text: float = 1.0
    pixel: float = 1.0
    semantic: float = 1.0


@dataclass
class SamplingConfig:
    """Defaults for sampling (docs/METHOD.md "Generation"); every call can override them."""

    temperature: float = 1.0  # visual codes; 0 = argmax
    top_k: int = 900  # 0 = off
    top_p: float = 0.96  # 1 = off
    cfg_scale: float = 3.0  # l = l_u + s·(l_c − l_u); 1 = no guidance
    text_temperature: float = 0.0  # answers; 0 = greedy
    text_top_k: int = 0
    text_top_p: float = 1.0
    max_new_tokens: int = 128

    def __post_init__(self) -> None:
        if self.temperature < 0 or self.text_temperature < 0:
            raise ConfigError("SamplingConfig: temperatures must be >= 0")
        if not 0.0 < self.top_p <= 1.0 or not 0.0 < self.text_top_p <= 1.0:
            raise ConfigError("SamplingConfig: top_p must be in (0, 1]")
        if self.top_k < 0 or self.text_top_k < 0 or self.max_new_tokens < 1:
            raise ConfigError("SamplingConfig: top_k must be >= 0 and max_new_tokens >= 1")


@dataclass
class MLLMConfig:
    """The whole MLLM. Relative paths are resolved against the folder of the file they were read from."""

    # the DualToken tokenizer: a folder written by save_pretrained, or an embedded model's name
    tokenizer: str = "dualtoken-efflite0"
    # the input size the MLLM reads that tokenizer at (DualTokenizer.at_resolution, convolutional backbones only);
    # None = the tokenizer's own size. Lets a shipped MLLM name an embedded tokenizer instead of carrying a resized copy
    tokenizer_image_size: int | None = None
    llm: LLMConfig = field(default_factory=lambda: LLMConfig(path="llm"))
    prompt: PromptConfig = field(default_factory=PromptConfig)
    fusion: FusionConfig = field(default_factory=FusionConfig)
    heads: DepthHeadConfig = field(default_factory=DepthHeadConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    # the first N residual depths of each vocabulary that the MLLM reads (the variable token budget of residual
    # codes); None = all of the tokenizer's depths. Images given in full depth are cut to the prefix
    pixel_depths: int | None = None
    semantic_depths: int | None = None
    # the first N depths that it predicts when it draws, at most the depths it reads; None = the depths it reads. A
    # drawn image is read back (fed to the next position, trained on) with these depths only, and decoded from its
    # prefix of pixel codes. Reading more than it draws buys answers without the cost of predicting every depth
    predict_pixel_depths: int | None = None
    predict_semantic_depths: int | None = None

    def __post_init__(self) -> None:
        depths = ("pixel_depths", "semantic_depths", "predict_pixel_depths", "predict_semantic_depths")
        for name in ("tokenizer_image_size", *depths):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"MLLMConfig.{name} must be >= 1 or null, got {value}")


@dataclass
class LoraSettings:
    """LoRA on the LLM through peft; the base LLM stays frozen, the adapters train."""

    enabled: bool = False
    r: int = 16
    alpha: float = 32.0
    dropout: float = 0.05
    target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")


@dataclass
class MLLMDataConfig:
    """Understanding conversations and generation captions, mixed in one run; images come from token files."""

    token_cache: tuple[str, ...] = ()  # token files or folders of them (written by `dualtoken encode`)
    conversations: tuple[str, ...] = ()  # LLaVA-style conversation JSON files
    captions: tuple[str, ...] = ()  # COCO-style JSON, JSONL, image folders with .txt files, WebDataset shards
    condition_dropout: float = 0.1  # a generation prompt is replaced by the blank prompt this often (CFG)
    max_length: int = 2048  # longer samples are cut before the first image that does not fit
    batch_size: int = 8  # per process and micro-step

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ConfigError(f"MLLMDataConfig.batch_size must be >= 1, got {self.batch_size}")
        if not 0.0 <= self.condition_dropout < 1.0:
            raise ConfigError(
                f"MLLMDataConfig.condition_dropout must be in [0, 1), got {self.condition_dropout}"
            )


def default_optimizer() -> OptimizerConfig:
    """AdamW for an LLM (the tokenizer trainer's defaults are a GAN's)."""
    return OptimizerConfig(lr=1e-4, betas=(0.9, 0.999), weight_decay=0.0, warmup_steps=30, grad_clip=1.0)


# what each preset trains (docs/METHOD.md "MLLM training stages"); everything else stays frozen, the DualToken tokenizer always
PRESETS = {
    "align": ("fusion",),  # stage 1: the input projector only
    "understanding": ("fusion", "llm"),  # stage 2
    "generation": ("heads",),  # stage 3: gen projectors + visual heads
    "full": ("fusion", "llm", "heads"),  # stage 4: joint
}


# the MLLM trainer's keys before it took the tokenizer trainer's names: old key -> new dotted key
LEGACY_KEYS = {
    "out_dir": "output_dir",
    "steps": "max_steps",
    "optim": "optimizer",
    "batch_size": "data.batch_size",
    "save_every": "checkpoint.every",
    "keep_last": "checkpoint.keep_last",
    "log_every": "log.every",
    "console": "log.console",
    "tensorboard": "log.tensorboard",
    "bf16": "precision",
}


@dataclass
class MLLMTrainConfig:
    """A training run: a new model (``model``) or a saved one (``init_from``), data, preset, optimiser, steps.

    The training engine's settings have the tokenizer's names and meaning (:class:`dualtoken.training.TrainConfig`):
    ``output_dir``, ``max_steps``, ``max_seconds``, ``grad_accum``, ``precision``, ``deterministic``, ``optimizer``,
    ``checkpoint``, ``log``, ``parallel``, ``device``, ``seed``.
    In a config file, relative paths are taken from the file's folder.
    """

    path_fields: ClassVar[tuple[str, ...]] = (
        "output_dir", "init_from", "data.token_cache", "data.conversations", "data.captions", "model.llm.path",
        "model.llm.text_tokenizer",
    )
    name_or_path_fields: ClassVar[tuple[str, ...]] = ("model.tokenizer",)

    model: MLLMConfig | None = None
    init_from: str | None = None  # an MLLM folder written by save_pretrained
    preset: Literal["align", "understanding", "generation", "full"] = "full"
    lora: LoraSettings = field(default_factory=LoraSettings)
    data: MLLMDataConfig = field(default_factory=MLLMDataConfig)
    optimizer: OptimizerConfig = field(default_factory=default_optimizer)  # shared with the tokenizer trainer
    output_dir: str = "runs/mllm"
    max_steps: int = 1000
    max_seconds: float = 0.0  # a wall-clock budget for the loop (0: none); ends the run as max_steps does
    grad_accum: int = 1  # micro-steps per optimiser step
    seed: int = 0
    device: str = "auto"  # auto: cuda:<LOCAL_RANK> when CUDA is available, else cpu
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"  # see dualtoken.precision
    deterministic: bool = False  # bitwise-repeatable runs (one CPU thread, deterministic kernels)
    parallel: Literal["ddp", "fsdp"] = "ddp"  # with several processes (torchrun): DDP, or FSDP2 fully_shard
    checkpoint: CheckpointConfig = field(default_factory=lambda: CheckpointConfig(every=500, keep_last=2))
    log: LogConfig = field(default_factory=lambda: LogConfig(console=False))  # MLLM runs use every, console,
    # jsonl, tensorboard and progress

    def __post_init__(self) -> None:
        if (self.model is None) == (self.init_from is None):
            raise ConfigError(
                "MLLMTrainConfig: give exactly one of `model` (a new MLLM) or `init_from` (a folder)"
            )
        if self.max_steps < 1 or self.grad_accum < 1 or self.max_seconds < 0:
            raise ConfigError("MLLMTrainConfig: max_steps and grad_accum must be >= 1, max_seconds >= 0")

    @classmethod
    def upgrade(cls, data: dict[str, Any]) -> dict[str, Any]:
        """A config dict with the keys of :data:`LEGACY_KEYS` renamed (``bf16``: true -> "bf16", false -> "fp32")."""
        data = dict(data)
        for old, new in LEGACY_KEYS.items():
            if old not in data:
                continue
            value = data.pop(old)
            if old == "bf16":
                value = "bf16" if value else "fp32"
            *parents, last = new.split(".")
            node = data
            for part in parents:
                node = node.setdefault(part, {})
            node.setdefault(last, value)
        return data


def load_config(cls: type[T], path: str | Path) -> T:
    """Read a config JSON file into ``cls`` (older key names upgraded; relative paths taken from the file's folder)."""
    return load_config_file(cls, path)


def save_config(config: Any, path: str | Path) -> None:
    Path(path).write_text(json.dumps(to_dict(config), indent=2) + "\n")


def locate(value: str, base: str | Path | None) -> str:
    """A name or path of a config read from folder ``base`` (a saved MLLM's folder, a config file's folder), by the
    rule of every config file (:func:`dualtoken.config.resolve_name_or_path`); ``value`` itself without a base."""
    return value if base is None else resolve_name_or_path(value, base)
