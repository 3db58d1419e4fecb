"""DualTokenMLLM: any transformers causal LM + DualToken's two vocabularies, for understanding and generation.

    text ids ──LLM embeddings──┐
    codes ──code tables──fusion─┴─> input embeddings (slots replaced) ──LLM──> hidden states
        text positions:   LM head ──> text cross-entropy (assistant turns, <image_gen_end>)
        visual positions: pixel head, semantic head (depth transformers) ──> Q codes each ──> visual cross-entropy

The DualToken tokenizer stays frozen inside (it encodes chat images and decodes generated pixel codes).
"""

from __future__ import annotations

import copy
import dataclasses
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
import transformers
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from ..errors import CheckpointError, ConfigError, DataError
from ..registry import MLLM_CONFIG_NAME, MLLM_WEIGHTS_NAME, resolve_mllm_dir
from ..tokenizer import DualTokenizer
from ..tokenizer_pair import TokenizerPair, load_visual_tokenizer
from .config import LoraSettings, MLLMConfig, load_config, locate, save_config
from .depth_head import DepthTransformer
from .fusion import BRANCHES, CodeTables, VisualInputFusion
from .prompt import IGNORE, PromptBuilder

CONFIG_NAME = MLLM_CONFIG_NAME
WEIGHTS_NAME = MLLM_WEIGHTS_NAME
OWN_MODULES = ("code_tables", "fusion", "pixel_head", "semantic_head")  # what mllm.safetensors holds
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# transformers renamed `torch_dtype` to `dtype` in 4.56
_DTYPE_KEYWORD = (
    "dtype" if tuple(int(x) for x in transformers.__version__.split(".")[:2]) >= (4, 56) else "torch_dtype"
)


@dataclass
class MLLMBatch:
    """A collated batch. Images are listed in the order their slots appear (row-major over batch and time)."""

    input_ids: torch.Tensor  # (B, T) long; image slots hold the slot token
    attention_mask: torch.Tensor  # (B, T) long, 0 = padding
    labels: torch.Tensor  # (B, T) long, IGNORE where there is no text loss; not shifted
    pixel_codes: torch.Tensor  # (M, h, w, Qp) long; at least the MLLM's pixel_depths
    semantic_codes: torch.Tensor  # (M, h, w, Qs) long; at least the MLLM's semantic_depths
    generate: torch.Tensor  # (M,) bool: a generation target (visual loss) or an understanding input

    def to(self, device: torch.device | str) -> MLLMBatch:
        return MLLMBatch(*(t.to(device) for t in dataclasses.astuple(self)))


@dataclass
class MLLMLoss:
    """The weighted total and its parts (each a mean over its own targets; 0 where a batch has none)."""

    loss: torch.Tensor
    text: torch.Tensor
    pixel: torch.Tensor
    semantic: torch.Tensor
    pixel_per_depth: torch.Tensor  # (Qp,)
    semantic_per_depth: torch.Tensor  # (Qs,)

    def scalars(self) -> dict[str, float]:
        out = {"loss": self.loss, "text": self.text, "pixel": self.pixel, "semantic": self.semantic}
        out = {k: float(v.detach()) for k, v in out.items()}
        for branch in BRANCHES:
            for depth, value in enumerate(getattr(self, f"{branch}_per_depth").tolist()):
                out[f"{branch}_depth{depth}"] = value
        return out


def build_llm(config: MLLMConfig, base_dir: str | Path | None) -> nn.Module:
    """The causal LM from a local folder, or randomly initialised from ``llm.architecture``."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = config.llm
    kwargs = {"attn_implementation": cfg.attn_implementation, _DTYPE_KEYWORD: _DTYPES[cfg.dtype]}
    if cfg.path is not None:
        folder = Path(locate(cfg.path, base_dir))
        if not (folder / "config.json").is_file():
            raise CheckpointError(f"no transformers model in {folder} (expected config.json + weights)")
        return AutoModelForCausalLM.from_pretrained(folder, **kwargs)
    architecture = dict(cfg.architecture)
    try:
        llm_config = AutoConfig.for_model(architecture.pop("model_type"), **architecture)
    except (ValueError, KeyError) as exc:
        raise ConfigError(f"llm.architecture: {exc}") from None
    return AutoModelForCausalLM.from_config(llm_config, **kwargs)


def load_text_tokenizer(config: MLLMConfig, base_dir: str | Path | None):
    from transformers import AutoTokenizer

    folder = Path(locate(config.llm.text_tokenizer or config.llm.path, base_dir))
    if not folder.is_dir():
        raise CheckpointError(f"text tokenizer folder not found: {folder}")
    return AutoTokenizer.from_pretrained(folder)


def add_marker_tokens(llm: nn.Module, text_tokenizer, markers: list[str]) -> None:
    """Add the image markers the text tokenizer lacks; their embedding rows start at the mean of the old rows [V]."""
    known = len(text_tokenizer)
    missing = [m for m in markers if m not in text_tokenizer.get_vocab()]
    if not missing:
        return
    text_tokenizer.add_special_tokens(
        {"additional_special_tokens": missing}, replace_additional_special_tokens=False
    )
    new_ids = text_tokenizer.convert_tokens_to_ids(missing)
    if max(new_ids) >= llm.get_input_embeddings().weight.shape[0]:
        llm.resize_token_embeddings(len(text_tokenizer), mean_resizing=False)
    tables = {
        id(t.weight): t.weight
        for t in (llm.get_input_embeddings(), llm.get_output_embeddings())
        if t is not None
    }
    with torch.no_grad():
        for weight in tables.values():
            weight[new_ids] = weight[:known].mean(dim=0)


def model_depths(
    config: MLLMConfig, visual_tokenizer: DualTokenizer | TokenizerPair
) -> tuple[dict[str, int], dict[str, int]]:
    """How many residual depths of each vocabulary the MLLM reads (``config.pixel_depths`` / ``semantic_depths``,
    or all of the tokenizer's) and how many it predicts (``config.predict_*_depths``, or the ones it reads)."""
    read, predict = {}, {}
    for branch in BRANCHES:
        wanted = getattr(config, f"{branch}_depths")
        available = getattr(visual_tokenizer, f"{branch}_depth")
        if wanted is not None and wanted > available:
            raise ConfigError(
                f"MLLMConfig.{branch}_depths is {wanted}, but the tokenizer's {branch} vocabulary has {available} depths"
            )
        read[branch] = available if wanted is None else wanted
        drawn = getattr(config, f"predict_{branch}_depths")
        if drawn is not None and drawn > read[branch]:
            raise ConfigError(
                f"MLLMConfig.predict_{branch}_depths is {drawn}, more than the {read[branch]} {branch} depths "
                "the MLLM reads: it draws a prefix of what it reads"
            )
        predict[branch] = read[branch] if drawn is None else drawn
    return read, predict


class DualTokenMLLM(nn.Module):
    """The unified MLLM. Build with :meth:`from_config`, load with :meth:`from_pretrained`."""

    def __init__(
        self, config: MLLMConfig, llm: nn.Module, text_tokenizer, visual_tokenizer: DualTokenizer | TokenizerPair
    ) -> None:
        super().__init__()
        self.config = config
        self.llm = llm
        self.text_tokenizer = text_tokenizer
        self.visual_tokenizer = visual_tokenizer.eval().requires_grad_(False)
        add_marker_tokens(llm, text_tokenizer, config.prompt.special_tokens)
        h, w = visual_tokenizer.grid
        self.tokens_per_image = h * w
        self.prompt = PromptBuilder(config.prompt, text_tokenizer, self.tokens_per_image)
        width = llm.get_input_embeddings().weight.shape[1]
        self.depths, self.predict_depths = model_depths(config, visual_tokenizer)  # read, drawn
        codebooks = []
        for branch in BRANCHES:
            codebook = visual_tokenizer.codebook(branch)  # (K, D), or (Q, K, D) with one codebook per depth
            codebooks.append(codebook[: self.depths[branch]] if codebook.dim() == 3 else codebook)
        self.code_tables = CodeTables(*codebooks, config.fusion.train_code_embeddings)
        code_dims = {b: self.code_tables.codebook(b).shape[-1] for b in BRANCHES}
        self.fusion = VisualInputFusion(config.fusion, code_dims, width)
        self.pixel_head, self.semantic_head = (
            DepthTransformer(
                width, code_dims[b], visual_tokenizer.codebook_size(b), self.predict_depths[b], config.heads
            )
            for b in BRANCHES
        )

    # ------------------------------------------------------------------------------------------------------------
    # construction, LoRA, checkpoints
    # ------------------------------------------------------------------------------------------------------------

    @classmethod
    def from_config(
        cls,
        config: MLLMConfig,
        base_dir: str | Path | None = None,
        visual_tokenizer: DualTokenizer | TokenizerPair | None = None,
    ) -> DualTokenMLLM:
        """A new MLLM: the LLM and both tokenizers from ``config`` (paths relative to ``base_dir``), fresh
        projectors and heads, code tables copied from the visual tokenizer's codebooks."""
        if visual_tokenizer is None:
            visual_tokenizer = load_visual_tokenizer(locate(config.tokenizer, base_dir))
            size = config.tokenizer_image_size
            if size is not None and tuple(visual_tokenizer.image_size) != (size, size):
                visual_tokenizer = visual_tokenizer.at_resolution(size)
        return cls(
            config, build_llm(config, base_dir), load_text_tokenizer(config, base_dir), visual_tokenizer
        )

    @classmethod
    def from_pretrained(cls, name_or_path: str | Path) -> DualTokenMLLM:
        """Load an embedded MLLM by name (``dualtoken-mllm-cifar10``; its files checked first, DamagedInstallError
        naming a missing or corrupted one) or a folder written by :meth:`save_pretrained`, in eval mode."""
        path = resolve_mllm_dir(name_or_path)
        if not (path / CONFIG_NAME).is_file() or not (path / WEIGHTS_NAME).is_file():
            raise CheckpointError(
                f"{path} is not a DualToken MLLM folder (expected {CONFIG_NAME} and {WEIGHTS_NAME})"
            )
        model = cls.from_config(load_config(MLLMConfig, path / CONFIG_NAME), base_dir=path)
        try:
            state = load_file(str(path / WEIGHTS_NAME))
        except (SafetensorError, OSError) as exc:
            raise CheckpointError(f"{path / WEIGHTS_NAME} is unreadable: {exc}") from None
        model.load_own_state(state, str(path / WEIGHTS_NAME))
        return model.eval()

    def own_state(self) -> dict[str, torch.Tensor]:
        """The MLLM's own weights (code tables, input fusion, visual heads); the LLM saves itself."""
        return {k: v for k, v in self.state_dict().items() if k.split(".", 1)[0] in OWN_MODULES}

    def load_own_state(self, state: dict[str, torch.Tensor], where: str) -> None:
        own = self.own_state()
        missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
        wrong = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
        if missing or unexpected or wrong:
            raise CheckpointError(
                f"{where} belongs to another MLLM config: missing {missing[:5]}, unexpected {unexpected[:5]}, "
                f"wrong shapes {wrong[:5]}"
            )
        self.load_state_dict(state, strict=False)

    def save_pretrained(self, path: str | Path) -> Path:
        """Write a self-contained folder atomically: the MLLM config and weights, the LLM (LoRA merged), the
        text tokenizer and the DualToken tokenizer."""
        path = Path(path)
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        llm = self.llm
        if self.lora_enabled:
            llm = copy.deepcopy(llm).merge_and_unload()
        llm.save_pretrained(tmp / "llm")
        self.text_tokenizer.save_pretrained(tmp / "text_tokenizer")
        self.visual_tokenizer.save_pretrained(tmp / "tokenizer")
        save_file(
            {k: v.detach().contiguous().cpu() for k, v in self.own_state().items()}, str(tmp / WEIGHTS_NAME)
        )
        llm_config = dataclasses.replace(
            self.config.llm, path="llm", architecture=None, text_tokenizer="text_tokenizer"
        )
        save_config(
            dataclasses.replace(self.config, tokenizer="tokenizer", tokenizer_image_size=None, llm=llm_config),
            tmp / CONFIG_NAME,
        )
        old = path.with_name(f".{path.name}.old{os.getpid()}")
        if path.exists():
            os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
        return path

    @property
    def image_size(self) -> tuple[int, int]:
        """(H, W): the input size of the visual tokenizer, which :meth:`chat` takes."""
        return tuple(self.visual_tokenizer.image_size)

    @property
    def lora_enabled(self) -> bool:
        return hasattr(self.llm, "peft_config")

    def enable_lora(self, settings: LoraSettings) -> None:
        """Wrap the LLM with peft LoRA adapters (the base weights freeze; the adapters train)."""
        from peft import LoraConfig, get_peft_model

        lora = LoraConfig(
            r=settings.r,
            lora_alpha=settings.alpha,
            lora_dropout=settings.dropout,
            target_modules=list(settings.target_modules),
            task_type="CAUSAL_LM",
        )
        try:
            self.llm = get_peft_model(self.llm, lora)
        except ValueError as exc:
            raise ConfigError(f"lora: {exc}") from None

    def train(self, mode: bool = True) -> DualTokenMLLM:
        super().train(mode)
        self.visual_tokenizer.eval()  # its codebooks never move
        return self

    @property
    def device(self) -> torch.device:
        return self.llm.get_input_embeddings().weight.device

    def head(self, branch: str) -> DepthTransformer:
        return self.pixel_head if branch == "pixel" else self.semantic_head

    # ------------------------------------------------------------------------------------------------------------
    # inputs
    # ------------------------------------------------------------------------------------------------------------

    def prefix(self, codes: torch.Tensor, branch: str, drawn: bool = False) -> torch.Tensor:
        """Codes (..., k) of one vocabulary -> their first ``self.depths[branch]`` depths, or with ``drawn`` the
        first ``self.predict_depths[branch]`` (DataError when k is smaller than the depths the MLLM reads)."""
        wanted = self.depths[branch]
        if codes.shape[-1] < wanted:
            raise DataError(
                f"{branch} codes of {codes.shape[-1]} depths, but this MLLM reads the first {wanted}: encode the "
                "images with all of the tokenizer's depths"
            )
        return codes[..., : self.predict_depths[branch] if drawn else wanted]

    def visual_inputs(
        self, pixel_codes: torch.Tensor, semantic_codes: torch.Tensor, drawn: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Codes (M, h, w, k) of both vocabularies, k at least the MLLM's depths -> LLM input vectors (M, h·w, width).
        The images marked in ``drawn`` ((M,) bool: generation targets) are read with the depths the MLLM predicts,
        as it reads its own drawing back while it draws."""
        for branch, codes in (("pixel", pixel_codes), ("semantic", semantic_codes)):
            if codes.shape[0]:
                self.visual_tokenizer.check_codes(codes, branch)
        pixel, semantic = self.prefix(pixel_codes, "pixel"), self.prefix(semantic_codes, "semantic")
        inputs = self.fuse(pixel.flatten(1, 2), semantic.flatten(1, 2))  # (M, h·w, width)
        if drawn is not None and drawn.any() and self.predict_depths != self.depths:
            pixel = self.prefix(pixel_codes[drawn], "pixel", drawn=True)
            semantic = self.prefix(semantic_codes[drawn], "semantic", drawn=True)
            inputs[drawn] = self.fuse(pixel.flatten(1, 2), semantic.flatten(1, 2))
        return inputs

    def fuse(self, pixel_codes: torch.Tensor, semantic_codes: torch.Tensor) -> torch.Tensor:
        """Codes (..., Q) of one position each -> (..., width)."""
        sums = {"pixel": self.code_tables.sums(pixel_codes, "pixel")}
        sums["semantic"] = self.code_tables.sums(semantic_codes, "semantic")
        return self.fusion(sums)

    def embed(
        self,
        input_ids: torch.Tensor,
        pixel_codes: torch.Tensor,
        semantic_codes: torch.Tensor,
        drawn: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Token embeddings (B, T, width) with every image slot replaced by its image's fused codes (``drawn``: see
        :meth:`visual_inputs`)."""
        slots = input_ids == self.prompt.slot_id
        images = pixel_codes.shape[0]
        if int(slots.sum()) != images * self.tokens_per_image or semantic_codes.shape[0] != images:
            raise DataError(
                f"the batch has {int(slots.sum())} image slots but {images} pixel / {semantic_codes.shape[0]} "
                f"semantic code maps of {self.tokens_per_image} positions each"
            )
        embeds = self.llm.get_input_embeddings()(input_ids)
        if images:
            visual = self.visual_inputs(pixel_codes, semantic_codes, drawn).to(embeds.dtype)
            embeds = embeds.masked_scatter(slots.unsqueeze(-1), visual)
        return embeds

    @property
    def pad_id(self) -> int:
        """The id written at padded positions (masked out; never the slot token)."""
        tokenizer = self.text_tokenizer
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        return pad if pad is not None and pad != self.prompt.slot_id else self.prompt.image_start_id

    def pad_prompts(self, prompts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Left-padded ids and attention mask (B, T) of inference prompts."""
        length = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), length), self.pad_id, dtype=torch.long)
        mask = torch.zeros(len(prompts), length, dtype=torch.long)
        for row, prompt in enumerate(prompts):
            ids[row, length - len(prompt) :] = torch.tensor(prompt, dtype=torch.long)
            mask[row, length - len(prompt) :] = 1
        return ids.to(self.device), mask.to(self.device)

    # ------------------------------------------------------------------------------------------------------------
    # training objective
    # ------------------------------------------------------------------------------------------------------------

    def forward(self, batch: MLLMBatch) -> MLLMLoss:
        """Text cross-entropy + per-depth visual cross-entropy of both vocabularies (docs/METHOD.md "Generation"), weighted."""
        embeds = self.embed(batch.input_ids, batch.pixel_codes, batch.semantic_codes, batch.generate)
        out = self.llm(
            inputs_embeds=embeds,
            attention_mask=batch.attention_mask,
            output_hidden_states=True,
            use_cache=False,
        )
        targets = batch.labels[:, 1:]
        text = F.cross_entropy(
            out.logits[:, :-1].flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE, reduction="sum"
        ) / (targets != IGNORE).sum().clamp(min=1)
        # the state before each slot of a generated image predicts that slot's codes
        slots = (batch.input_ids == self.prompt.slot_id).nonzero()  # (M·N, 2), row-major = image order
        generated = batch.generate.repeat_interleave(self.tokens_per_image)
        rows, cols = slots[generated].unbind(-1)
        states = out.hidden_states[-1][rows, cols - 1]  # (M_gen·N, width)
        visual = {}
        for branch in BRANCHES:
            drawn = self.prefix(getattr(batch, f"{branch}_codes")[batch.generate], branch, drawn=True)
            codes = drawn.flatten(0, 2)  # (M_gen·N, Q) of the depths it predicts
            per_depth = self.head(branch).losses(
                states, codes, self.code_tables.vectors(codes[:, :-1], branch), self.code_tables.codebook(branch)
            )  # (Q,) summed over the M_gen·N positions
            visual[branch] = per_depth / max(codes.shape[0], 1)
        weights = self.config.loss
        pixel, semantic = visual["pixel"].mean(), visual["semantic"].mean()
        total = weights.text * text + weights.pixel * pixel + weights.semantic * semantic
        return MLLMLoss(total, text, pixel, semantic, visual["pixel"], visual["semantic"])

    # ------------------------------------------------------------------------------------------------------------
    # inference (see generation.py)
    # ------------------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def chat(self, image: torch.Tensor | None, question: str, **options) -> str:
        """Answer ``question`` about ``image`` ((3, H, W) or (1, 3, H, W) in [-1, 1] at the tokenizer's size
        ``self.visual_tokenizer.image_size``, e.g. ``dualtoken.io.load_image(path, that size)``; any other size
        raises ImageError), or None for a text-only question. Options: those of
        :func:`dualtoken.mllm.generation.answer`."""
        from .generation import answer

        codes = None
        if image is not None:
            image = image.unsqueeze(0) if image.dim() == 3 else image
            tokens = self.visual_tokenizer.encode(image.to(self.device))
            codes = (tokens.pixel, tokens.semantic)
        return answer(self, [question], codes, **options)[0]

    @torch.no_grad()
    def generate(self, prompt: str, cfg_scale: float | None = None, seed: int = 0, **options) -> torch.Tensor:
        """An image (1, 3, H, W), [-1, 1] scale, for ``prompt``; deterministic for a given seed. Options: those of
        :func:`dualtoken.mllm.generation.generate_images`."""
        from .generation import generate_images

        return generate_images(self, [prompt], cfg_scale=cfg_scale, seed=seed, **options).images
