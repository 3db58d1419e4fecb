"""Class-name files, prompt templates, top-k scoring, and the cached SigLIP text classifier."""

from types import SimpleNamespace

import pytest
import torch

from dualtoken.errors import DataError
from dualtoken.evaluation import zeroshot
from dualtoken.evaluation.config import EvalConfig
from dualtoken.evaluation.semantic import build_classifier
from dualtoken.evaluation.templates import OPENAI_IMAGENET_TEMPLATES
from dualtoken.evaluation.zeroshot import cached_text_classifier, canonicalize, read_class_names, topk_hits

from .conftest import CLASS_NAMES


def test_templates_are_the_80_openai_ones():
    assert len(OPENAI_IMAGENET_TEMPLATES) == 80 == len(set(OPENAI_IMAGENET_TEMPLATES))
    assert all(t.count("{}") == 1 for t in OPENAI_IMAGENET_TEMPLATES)
    assert OPENAI_IMAGENET_TEMPLATES[0] == "a bad photo of a {}." and "itap of my {}." in OPENAI_IMAGENET_TEMPLATES


@pytest.mark.data
def test_reads_imagenet_classes_tsv(shared_data):
    names = read_class_names(shared_data / "imagenet_samples" / "classes.tsv")
    assert len(names) == 1000 and names[0] == "tench" and names[1] == "goldfish"


def test_reads_one_name_per_line_and_rejects_a_bad_tsv(tmp_path):
    (tmp_path / "classes.txt").write_text("airplane\nautomobile\n\n")
    assert read_class_names(tmp_path / "classes.txt") == ["airplane", "automobile"]
    (tmp_path / "bad.tsv").write_text("index\twnid\n0\tn1\n")
    with pytest.raises(DataError, match="name"):
        read_class_names(tmp_path / "bad.tsv")


def test_canonicalize_drops_punctuation_and_case():
    assert canonicalize("A photo of the Jack-O'-Lantern.") == "a photo of the jackolantern"


def test_topk_hits():
    scores = torch.tensor([[0.1, 0.9, 0.5], [0.8, 0.1, 0.3], [0.2, 0.3, 0.1]])
    labels = torch.tensor([1, 2, 2])
    top1, top2 = topk_hits(scores, labels, 2)
    assert top1.tolist() == [1.0, 0.0, 0.0] and top2.tolist() == [1.0, 1.0, 0.0]
    assert topk_hits(scores, labels, 10)[1].tolist() == [1.0, 1.0, 1.0]  # k is capped at the class count


def test_text_classifier_is_normalised_and_cached(tiny_siglip_dir, tmp_path, monkeypatch):
    args = (tiny_siglip_dir, list(CLASS_NAMES), OPENAI_IMAGENET_TEMPLATES, 64, 32, "canonicalize", tmp_path)
    classifier, path = cached_text_classifier(*args)
    assert classifier.shape == (3, 64) and path.is_file()
    torch.testing.assert_close(classifier.norm(dim=-1), torch.ones(3))
    assert not torch.allclose(classifier[0], classifier[1])

    def must_not_build(*_args, **_kwargs):
        raise AssertionError("the cached classifier should have been read")

    monkeypatch.setattr(zeroshot, "build_text_classifier", must_not_build)
    again, same_path = cached_text_classifier(*args)
    assert same_path == path and torch.equal(again, classifier)
    with pytest.raises(AssertionError):  # other class names: another cache entry
        cached_text_classifier(tiny_siglip_dir, ["x", "y"], *args[2:])


def test_a_classifier_head_backbone_scores_with_its_own_logits():
    tokenizer = SimpleNamespace(
        config=SimpleNamespace(backbone=SimpleNamespace(kind="efficientnet", pretrained=None)),
        backbone=SimpleNamespace(pooled_width=1000),
    )
    classifier, reason = build_classifier(tokenizer, EvalConfig(), None)
    assert reason is None and classifier.kind == "head"
    logits = torch.randn(2, 1000)
    assert torch.equal(classifier.scores(logits), logits)


def test_no_pretrained_folder_means_no_zero_shot_and_says_why(tiny_tokenizer):
    classifier, reason = build_classifier(tiny_tokenizer, EvalConfig(), None)
    assert classifier is None and "pretrained" in reason


def test_zero_shot_classifiers_are_kept_under_the_package_cache_folder(tmp_path, monkeypatch):
    from dualtoken.evaluation.semantic import default_cache_dir

    monkeypatch.setenv("DUALTOKEN_CACHE", str(tmp_path))
    assert default_cache_dir() == tmp_path / "zeroshot"
