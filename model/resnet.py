"""The ResNet-50 baseline (Table 9), torchvision's definition, so ConvNeXt-T is compared with the real thing."""
from __future__ import annotations

from torch import nn
from torchvision.models.resnet import Bottleneck, ResNet


def resnet(depths: tuple[int, ...], num_classes: int = 1000, activation: str = "relu") -> nn.Module:
    if activation != "relu":
        raise ValueError(f"the ResNet baseline is defined with ReLU only, got activation={activation!r}")
    return ResNet(Bottleneck, list(depths), num_classes=num_classes)
