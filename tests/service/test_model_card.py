"""What /models says a model is: source kind, dataset and a sentence, from the manifest (old manifests included)."""
from __future__ import annotations

import pytest

from runtime.repository import ModelRepository
from service.model_card import SERVE_IMAGENET_COMMAND, describe


@pytest.fixture(scope="module")
def manifest(model_repository):
    return ModelRepository(model_repository).load("atto").manifest  # random init, 10 classes


def with_source(manifest, labels=None, **source):
    labels = labels or manifest.labels
    return manifest.model_copy(update={"source": manifest.source.model_copy(update=source), "labels": labels})


@pytest.mark.parametrize(("source", "labels", "kind", "dataset", "phrase"), [
    ({}, None, "random", None, "random (untrained) weights"),
    ({"format": "project", "checkpoint": "checkpoint_best.pth", "dataset": "digits"}, None, "demo", "digits",
     "The offline demo model: convnext_atto trained on handwritten digits"),
    # a manifest written before source.dataset existed: the demo is still recognised by its labels
    ({"format": "project", "checkpoint": "checkpoint_best.pth"}, tuple(str(i) for i in range(10)), "demo", "digits",
     "It only knows digits"),
    ({"format": "project", "checkpoint": "checkpoint_best.pth", "dataset": "flowers"}, None, "checkpoint", "flowers",
     "from the checkpoint checkpoint_best.pth, trained on flowers"),
    ({"format": "official", "checkpoint": "x.pth", "dataset": "ImageNet-22K"}, None, "official", "ImageNet-22K",
     "with the official ImageNet-22K weights (x.pth)"),
])
def test_describe(manifest, source, labels, kind, dataset, phrase):
    card = describe(with_source(manifest, labels, **source))
    assert (card["source"], card["dataset"], card["num_classes"]) == (kind, dataset, 10)
    assert phrase in card["summary"] and card["sample_labels"] == list((labels or manifest.labels)[:5])
    assert card["serve_imagenet_command"] == (SERVE_IMAGENET_COMMAND if kind in ("demo", "random") else None)


def test_the_demo_card_says_its_digits_are_light_on_dark_and_to_invert_a_drawing_on_paper(manifest):
    """training/data.py never inverts scikit-learn's digits (light ink on a dark background): a digit written dark on
    paper, or a transparent drawing put on white, is not recognised unless inverted, and the card says so."""
    card = describe(with_source(manifest, format="project", checkpoint="checkpoint_best.pth", dataset="digits"))
    assert "light digits on a dark background like scikit-learn's 8x8 digits" in card["summary"]
    assert "Invert a dark-on-light drawing (ink on paper) first" in card["summary"]
