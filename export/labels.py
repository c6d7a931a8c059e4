"""Class names for an exported model: ImageNet-1K from torchvision's shipped metadata, or generic ones."""
from __future__ import annotations

IMAGENET_NUM_CLASSES = 1000


def imagenet_labels() -> tuple[str, ...]:
    """The 1000 ImageNet-1K class names, in class-id order (shipped with torchvision, no download)."""
    from torchvision.models import ResNet50_Weights

    return tuple(ResNet50_Weights.IMAGENET1K_V1.meta["categories"])


def generic_labels(num_classes: int) -> tuple[str, ...]:
    return tuple(f"class_{i}" for i in range(num_classes))


def default_labels(num_classes: int) -> tuple[str, ...]:
    return imagenet_labels() if num_classes == IMAGENET_NUM_CLASSES else generic_labels(num_classes)
