"""The lmms-eval model ``dualtoken``: ``lmms-eval --model dualtoken --model_args pretrained=FOLDER --tasks ...``.

lmms-eval finds it through the ``lmms_eval.models`` entry point (pyproject.toml), which names :func:`manifest`.
Importing this module needs lmms-eval (``pip install -e ".[harness]"`` then ``pip install --no-deps
lmms-eval==0.7.3``, docs/MLLM.md); the request handling itself is ``dualtoken.mllm.harness``.
"""

from __future__ import annotations

from lmms_eval.api.instance import GenerationResult, Instance
from lmms_eval.api.model import lmms
from lmms_eval.models.registry_v2 import ModelManifest
from tqdm import tqdm

from . import Question, generate_until, load_mllm, loglikelihood

MODEL_NAME = "dualtoken"


class DualTokenLMMS(lmms):
    """A saved DualToken MLLM folder as an lmms-eval model: ``generate_until`` and ``loglikelihood`` over a batch
    of requests, each with the images ``doc_to_visual`` gives for its document."""

    def __init__(
        self, pretrained: str, batch_size: int | str = 8, device: str = "cpu", seed: int | str = 0, **unused
    ) -> None:
        super().__init__()
        self.model = load_mllm(pretrained, device)
        self.batch_size = int(batch_size)
        self.seed = int(seed)

    def _question(self, context: str, doc_to_visual, doc_id: int, task: str, split: str) -> Question:
        doc = self.task_dict[task][split][doc_id]
        visuals = doc_to_visual(doc) if doc_to_visual is not None else []
        return Question(context, [v for v in visuals or [] if v is not None], f"{task}/{split}/{doc_id}")

    def generate_until(self, requests: list[Instance]) -> list[str]:
        """Requests with the same generation options run together, ``self.batch_size`` at a time."""
        answers: list[str | None] = [None] * len(requests)
        groups: dict[str, list[int]] = {}
        for index, request in enumerate(requests):
            groups.setdefault(repr(sorted(request.args[1].items())), []).append(index)
        progress = tqdm(total=len(requests), disable=self.rank != 0, desc="dualtoken answers")
        for indices in groups.values():
            options = dict(requests[indices[0]].args[1])
            until = options.get("until", [])
            questions = [
                self._question(context, doc_to_visual, doc_id, task, split)
                for context, _, doc_to_visual, doc_id, task, split in (requests[i].args for i in indices)
            ]
            texts = generate_until(
                self.model,
                questions,
                until=[until] if isinstance(until, str) else until,
                max_new_tokens=options.get("max_new_tokens"),
                temperature=float(options.get("temperature", 0.0)),
                batch_size=self.batch_size,
                seed=self.seed,
            )
            for index, text in zip(indices, texts):
                answers[index] = text
            progress.update(len(indices))
        progress.close()
        return answers

    def loglikelihood(self, requests: list[Instance]) -> list[GenerationResult]:
        """Per request, lmms-eval's pair (the continuation's negative log-likelihood, summed over its tokens;
        whether greedy decoding gives it). lmms-eval 0.7.3 expects a loss here, not a log-likelihood: its multiple
        choice takes the argmin. Each pair travels in a GenerationResult because 0.7.3's evaluator turns any
        other non-text answer into its string (``unwrap_generation_output``), which breaks multiple choice."""
        questions, continuations = [], []
        for context, doc_to_target, doc_to_visual, doc_id, task, split in (r.args for r in requests):
            question = self._question(context, doc_to_visual, doc_id, task, split)
            target = doc_to_target if isinstance(doc_to_target, str) else doc_to_target(
                self.task_dict[task][split][doc_id]
            )
            questions.append(question)
            continuations.append(str(target))
        scored = loglikelihood(self.model, questions, continuations, batch_size=self.batch_size)
        return [GenerationResult(text=(-score, greedy)) for score, greedy in scored]

    def generate_until_multi_round(self, requests: list[Instance]) -> list[str]:
        raise NotImplementedError("the dualtoken model answers single-turn requests only")


def manifest() -> ModelManifest:
    """The entry point's payload: the model name and where its class lives."""
    return ModelManifest(model_id=MODEL_NAME, simple_class_path=f"{__name__}.{DualTokenLMMS.__name__}")
