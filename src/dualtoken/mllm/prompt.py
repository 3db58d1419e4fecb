"""Turning conversations and captions into token ids, text labels and image slots (docs/METHOD.md "The unified MLLM").

Every image takes exactly ``tokens_per_image`` (= h·w) slots between two markers:
understanding ``<image_start> slot … slot <image_end>``, generation ``<image_gen_start> slot … slot <image_gen_end>``.
The model replaces each slot's embedding by the fused code embeddings of that grid position.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import DataError
from .config import PromptConfig

IGNORE = -100  # label of positions without text loss


@dataclass
class RenderedSample:
    """One training sequence. ``labels[t]`` is the target of position t itself (the model shifts)."""

    input_ids: list[int] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    generate: list[bool] = field(default_factory=list)  # per image in order: a generation target, or an input
    spans: list[tuple[int, int]] = field(default_factory=list)  # per image: [start marker, end marker] + 1

    def add(self, ids: list[int], trained: bool) -> None:
        self.input_ids += ids
        self.labels += ids if trained else [IGNORE] * len(ids)

    def truncated(self, max_length: int) -> RenderedSample:
        """At most ``max_length`` tokens, cut before the first image block that does not fit whole."""
        if len(self.input_ids) <= max_length:
            return self
        keep = sum(1 for _, end in self.spans if end <= max_length)
        cut = max_length if keep == len(self.spans) else self.spans[keep][0]
        return RenderedSample(
            self.input_ids[:cut], self.labels[:cut], self.generate[:keep], self.spans[:keep]
        )


class PromptBuilder:
    """Renders turns with the fixed template of :class:`PromptConfig`; the markers must be single tokens."""

    def __init__(self, config: PromptConfig, text_tokenizer, tokens_per_image: int) -> None:
        self.config = config
        self.text_tokenizer = text_tokenizer
        self.tokens_per_image = tokens_per_image
        ids = {}
        for marker in config.special_tokens:
            token_id = text_tokenizer.convert_tokens_to_ids(marker)
            if token_id is None or token_id == text_tokenizer.unk_token_id:
                raise DataError(
                    f"the text tokenizer has no token {marker!r}; build the MLLM with DualTokenMLLM"
                )
            ids[marker] = token_id
        self.image_start_id = ids[config.image_start]
        self.image_end_id = ids[config.image_end]
        self.image_gen_start_id = ids[config.image_gen_start]
        self.image_gen_end_id = ids[config.image_gen_end]
        self.slot_id = ids[config.image_slot]
        self.bos = list(text_tokenizer("")["input_ids"])  # e.g. [<s>] for Llama, [] for Qwen2

    # ------------------------------------------------------------------------------------------------------------

    def text(self, text: str) -> list[int]:
        return list(self.text_tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []

    def _image_block(self, sample: RenderedSample, generate: bool) -> None:
        if generate:
            start, end = self.image_gen_start_id, self.image_gen_end_id
        else:
            start, end = self.image_start_id, self.image_end_id
        first = len(sample.input_ids)
        sample.spans.append((first, first + self.tokens_per_image + 2))
        sample.generate.append(generate)
        sample.add([start] + [self.slot_id] * self.tokens_per_image, trained=False)
        # the last visual position predicts the end marker of a generated image (text loss) [V]
        sample.add([end], trained=generate)

    def _user_text(self, sample: RenderedSample, text: str) -> None:
        pieces = text.split(self.config.image_placeholder)
        for i, piece in enumerate(pieces):
            if i:
                self._image_block(sample, generate=False)
            sample.add(self.text(piece), trained=False)

    def _begin(self) -> RenderedSample:
        sample = RenderedSample()
        sample.add(self.bos + self.text(self.config.system), trained=False)
        return sample

    def count_placeholders(self, text: str) -> int:
        return text.count(self.config.image_placeholder)

    # ------------------------------------------------------------------------------------------------------------

    def conversation(
        self, turns: list[tuple[str, str]], num_images: int, where: str = "conversation"
    ) -> RenderedSample:
        """Roles "user" / "assistant"; text loss on the assistant turns (their text and the closing suffix)."""
        found = sum(self.count_placeholders(text) for role, text in turns if role == "user")
        if found != num_images:
            raise DataError(
                f"{where}: {found} {self.config.image_placeholder} placeholder(s) in the user turns but "
                f"{num_images} image(s) given; put one placeholder per image"
            )
        cfg = self.config
        sample = self._begin()
        for role, text in turns:
            if role == "user":
                sample.add(self.text(cfg.user_prefix), trained=False)
                self._user_text(sample, text)
                sample.add(self.text(cfg.user_suffix), trained=False)
            else:
                sample.add(self.text(cfg.assistant_prefix), trained=False)
                sample.add(self.text(text + cfg.assistant_suffix), trained=True)
        return sample

    def _generation_request(self, prompt: str) -> RenderedSample:
        """The user turn with ``prompt`` and the assistant prefix."""
        if self.count_placeholders(prompt):
            raise DataError(
                f"a generation prompt may not contain {self.config.image_placeholder}: {prompt!r}"
            )
        cfg = self.config
        sample = self._begin()
        sample.add(
            self.text(cfg.user_prefix + prompt + cfg.user_suffix + cfg.assistant_prefix), trained=False
        )
        return sample

    def generation(self, prompt: str) -> RenderedSample:
        """A caption followed by its image as the assistant's answer (visual loss on the image's codes)."""
        sample = self._generation_request(prompt)
        self._image_block(sample, generate=True)
        sample.add(self.text(self.config.assistant_suffix), trained=True)
        return sample

    def generation_prompt(self, prompt: str) -> list[int]:
        """The inference prefix of a generated image: user turn, assistant prefix, ``<image_gen_start>``."""
        return self._generation_request(prompt).input_ids + [self.image_gen_start_id]

    def chat_prompt(self, question: str, num_images: int) -> list[int]:
        """The inference prefix of an answer; images without placeholders go before the question."""
        if num_images and not self.count_placeholders(question):
            question = self.config.image_placeholder * num_images + "\n" + question
        sample = self.conversation([("user", question)], num_images, where="question")
        return sample.input_ids + self.text(self.config.assistant_prefix)

    @property
    def stop_text(self) -> str:
        """An answer ends where this text appears (or at the tokenizer's end-of-sequence token)."""
        return self.config.assistant_suffix.strip()
