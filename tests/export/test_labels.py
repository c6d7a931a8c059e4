"""Class names an export gets by default: ImageNet-1K's from torchvision, ImageNet-22K's and timm's ImageNet-12K's
from the WordNet lemmas shipped in export/label_data/ (checked against the installed timm, whose ImageNetInfo reads
the same files for the same class counts), generic ones otherwise."""
from __future__ import annotations

import pytest
from timm.data import ImageNetInfo, infer_imagenet_subset

from export import labels
from model.pretrained import PRETRAINED_CHECKPOINTS
from model.timm_pretrained import TIMM_PRETRAINED


@pytest.mark.parametrize("num_classes", [labels.IMAGENET_12K_NUM_CLASSES, labels.IMAGENET_22K_NUM_CLASSES])
def test_the_shipped_imagenet_names_are_timms_in_class_order(num_classes):
    timm_info = ImageNetInfo(infer_imagenet_subset({"num_classes": num_classes}))
    assert labels.default_labels(num_classes) == tuple(timm_info.label_descriptions())
    if num_classes == labels.IMAGENET_22K_NUM_CLASSES:
        assert tuple(labels.imagenet22k_lemmas()) == tuple(timm_info.label_names())  # the synsets, sorted
        assert labels.imagenet22k_lemmas()["n02123045"] == "tabby, tabby cat"


def test_every_pretrained_class_count_gets_real_names():
    """The official checkpoints (1K, 22K) and timm's classifier tags (1K, 12K, 22K): none is served with class_N
    names. (timm's CLIP image towers end in 640 embedding dimensions, not classes.)"""
    counts = {entry.num_classes for entry in PRETRAINED_CHECKPOINTS.values()} | \
        {entry.num_classes for entry in TIMM_PRETRAINED.values() if "CLIP" not in entry.dataset}
    assert counts <= set(labels.KNOWN_CLASS_COUNTS), counts
    for count in counts:
        names = labels.default_labels(count)
        assert len(names) == count and not any(name.startswith("class_") for name in names)


def test_another_class_count_gets_generic_names():
    assert labels.default_labels(3) == ("class_0", "class_1", "class_2")
    assert labels.default_labels(1000)[0] == "tench"
