"""What /models says a model is: source kind, dataset and a sentence, from the manifest (old manifests included)."""
from __future__ import annotations

import httpx
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
    ({"format": "official", "checkpoint": "convnext_atto_22k.pth", "dataset": "ImageNet-22K",
      "pretrained": "convnext_atto_22k"}, None, "official", "ImageNet-22K",
     "with the official ImageNet-22K weights convnext_atto_22k (convnext_atto_22k.pth)"),
    ({"format": "timm", "checkpoint": "pytorch_model.bin", "dataset": "ImageNet-1K",
      "pretrained": "convnext_atto.d2_in1k"}, None, "official", "ImageNet-1K",
     "with timm's ImageNet-1K weights convnext_atto.d2_in1k (pytorch_model.bin)"),
    # official key names only (the official repository's own fine-tuning, or a manifest from before
    # source.pretrained): a checkpoint in that format, never "official weights"
    ({"format": "official", "checkpoint": "checkpoint-best.pth"}, None, "checkpoint", None,
     "from the checkpoint checkpoint-best.pth (in the official ConvNeXt repository's format); it recognises 10"),
    ({"format": "torchvision", "checkpoint": "mine.pth", "dataset": "flowers"}, None, "checkpoint", "flowers",
     "from the checkpoint mine.pth (in torchvision's format), trained on flowers"),
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


def test_a_model_fine_tuned_with_the_official_code_is_served_as_a_checkpoint_not_as_official_weights(
        tmp_path, launch):
    """The official repository's main.py saves {"model": state_dict, "epoch", ...} with its (our) key names and no
    model name: a model fine-tuned on 5 flower classes exports with source.format "official", and /models must not
    call it the official pretrained weights."""
    import torch

    from export.onnx import export_onnx_version
    from model import create_model

    checkpoint = tmp_path / "checkpoint-best.pth"
    torch.save({"model": create_model("convnext_atto", num_classes=5).state_dict(), "epoch": 29}, checkpoint)
    labels = ["daisy", "dandelion", "rose", "sunflower", "tulip"]
    version = export_onnx_version(tmp_path / "models", "flowers", "convnext_atto", checkpoint=checkpoint,
                                  num_classes=5, input_size=64, labels=labels)
    assert (version.manifest.source.format, version.manifest.source.pretrained) == ("official", None)
    with launch(tmp_path / "models") as url:
        (served,) = httpx.get(f"{url}/models").json()["models"]
    card = served["description"]
    assert (card["source"], card["pretrained"], card["checkpoint"]) == ("checkpoint", None, "checkpoint-best.pth")
    assert "official" not in card["summary"].replace("official ConvNeXt repository's format", "")
    assert card["summary"].startswith("convnext_atto from the checkpoint checkpoint-best.pth (in the official ConvNeXt "
                                      "repository's format); it recognises 5 classes (daisy, ")
