"""Class names for an exported model: ImageNet-1K from torchvision's shipped metadata; ImageNet-22K (21841 classes,
the official ConvNeXt 22k checkpoints and timm's `fb_in22k`) and timm's ImageNet-12K subset (11821 classes, the
`in12k` tags) from the WordNet lemmas in label_data/; generic names for any other class count.

label_data/ holds, in class-id order, the 21841 synsets of ImageNet-22K (sorted, as ImageFolder indexes them) with
their lemmas, and the 11821 synsets of ImageNet-12K: timm 1.0.31's `timm/data/_info` files (imagenet22k_synsets.txt,
imagenet12k_synsets.txt, imagenet_synset_to_lemma.txt; Apache-2.0), which timm's ImageNetInfo reads for the same class
counts (tests/export/test_labels.py checks them against an installed timm).
"""
from __future__ import annotations

import functools
import gzip
from pathlib import Path

IMAGENET_NUM_CLASSES = 1000
IMAGENET_22K_NUM_CLASSES = 21841
IMAGENET_12K_NUM_CLASSES = 11821
LABEL_DATA = Path(__file__).resolve().parent / "label_data"


def imagenet_labels() -> tuple[str, ...]:
    """The 1000 ImageNet-1K class names, in class-id order (shipped with torchvision, no download)."""
    from torchvision.models import ResNet50_Weights

    return tuple(ResNet50_Weights.IMAGENET1K_V1.meta["categories"])


@functools.cache
def imagenet22k_lemmas() -> dict[str, str]:
    """ImageNet-22K's synsets in class-id order -> their WordNet lemmas ("n02123159" -> "tiger cat")."""
    with gzip.open(LABEL_DATA / "imagenet22k.tsv.gz", "rt", encoding="utf-8") as rows:
        return dict(row.rstrip("\n").split("\t", 1) for row in rows)


def imagenet22k_labels() -> tuple[str, ...]:
    return tuple(imagenet22k_lemmas().values())


def imagenet12k_labels() -> tuple[str, ...]:
    """timm's ImageNet-12K: 11821 of ImageNet-22K's synsets, in its own class-id order."""
    lemmas = imagenet22k_lemmas()
    with gzip.open(LABEL_DATA / "imagenet12k_synsets.txt.gz", "rt", encoding="utf-8") as synsets:
        return tuple(lemmas[synset.strip()] for synset in synsets)


def generic_labels(num_classes: int) -> tuple[str, ...]:
    return tuple(f"class_{i}" for i in range(num_classes))


KNOWN_CLASS_COUNTS = {IMAGENET_NUM_CLASSES: imagenet_labels, IMAGENET_22K_NUM_CLASSES: imagenet22k_labels,
                      IMAGENET_12K_NUM_CLASSES: imagenet12k_labels}


def default_labels(num_classes: int) -> tuple[str, ...]:
    known = KNOWN_CLASS_COUNTS.get(num_classes)
    return known() if known is not None else generic_labels(num_classes)
