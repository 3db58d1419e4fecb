"""The lmms-eval model ``dualtoken``: ``lmms-eval --model dualtoken --model_args pretrained=FOLDER --tasks ...``.

lmms-eval finds it through the ``lmms_eval.models`` entry point (pyproject.toml), which names :func:`manifest`.
Using it needs lmms-eval (``pip install -e ".[harness]"`` then ``pip install --no-deps lmms-eval==0.7.3``,
docs/MLLM.md); without it the module still imports (so does every module of the package) and the class refuses
to be built. The request handling itself is ``dualtoken.mllm.harness``.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from tqdm import tqdm

from ...errors import ConfigError
from . import Question, generate_until, load_mllm, loglikelihood

if TYPE_CHECKING:
    from lmms_eval.models.registry_v2 import ModelManifest

try:
    from lmms_eval.api.instance import GenerationResult, Instance
    from lmms_eval.api.model import lmms
except ModuleNotFoundError as missing:
    MISSING: ModuleNotFoundError | None = missing
    lmms = object
else:
    MISSING = None

MODEL_NAME = "dualtoken"
INSTALL = 'pip install -e ".[harness]" and pip install --no-deps lmms-eval==0.7.3 (docs/MLLM.md)'


def require_lmms_eval() -> None:
    """Raise ModuleNotFoundError, saying how to install it, where lmms-eval is missing."""
    if MISSING is not None:
        raise ModuleNotFoundError(f"lmms-eval is not installed ({MISSING}); {INSTALL}")


class DualTokenLMMS(lmms):
    """A saved DualToken MLLM folder as an lmms-eval model: ``generate_until`` and ``loglikelihood`` over a batch
    of requests, each with the images ``doc_to_visual`` gives for its document."""

    def __init__(
        self, pretrained: str, batch_size: int | str = 8, device: str = "cpu", seed: int | str = 0, **unused
    ) -> None:
        require_lmms_eval()
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
    require_lmms_eval()
    # imported here: lmms_eval.models loads the entry points, this one included, when it is first imported
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id=MODEL_NAME, simple_class_path=f"{__name__}.{DualTokenLMMS.__name__}")


def run_tasks(
    model: str | Path,
    tasks: list[str],
    include_path: str | Path | None = None,
    limit: int | None = None,
    batch_size: int = 8,
    device: str = "cpu",
) -> dict:
    """lmms-eval's results dict (``results[task][metric]``) for ``tasks`` on the MLLM folder ``model``.
    Needs lmms-eval installed (docs/MLLM.md); a bad model folder or a missing image raises the typed error."""
    require_lmms_eval()
    from lmms_eval.evaluator import simple_evaluate
    from lmms_eval.tasks import TaskManager

    adapter = DualTokenLMMS(pretrained=str(model), batch_size=batch_size, device=device)
    manager = TaskManager("WARNING", include_path=None if include_path is None else str(include_path))
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise ConfigError(f"unknown lmms-eval task(s) {unknown}; a local task needs --include-path")
    out = simple_evaluate(
        model=adapter, tasks=tasks, task_manager=manager, limit=limit, batch_size=batch_size, log_samples=False,
        verbosity="WARNING", bootstrap_iters=0,
    )
    return out["results"]
