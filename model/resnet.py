"""The ResNet-50 baseline (Table 9), torchvision's definition, so ConvNeXt-T is compared with the real thing.

Stochastic depth on the residual branches is the one addition (Section 2.1: the modernized training recipe uses it);
it has no parameters, so state dicts stay torchvision's and torchvision checkpoints load unchanged.
"""
from __future__ import annotations

import torch
from torch import nn
from torchvision.models.resnet import Bottleneck, ResNet

from .convnext import DropPath, _drop_path_rates


class StochasticDepthBottleneck(Bottleneck):
    """torchvision's Bottleneck with the residual branch dropped per sample while training (`drop_path`)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.drop_path = DropPath(0.0)  # the rate is set per block by `resnet`

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(self.drop_path(out) + identity)


def resnet(depths: tuple[int, ...], num_classes: int = 1000, activation: str = "relu",
           drop_path_rate: float = 0.0) -> nn.Module:
    if activation != "relu":
        raise ValueError(f"the ResNet baseline is defined with ReLU only, got activation={activation!r}")
    model = ResNet(StochasticDepthBottleneck, list(depths), num_classes=num_classes)
    blocks = [block for layer in (model.layer1, model.layer2, model.layer3, model.layer4) for block in layer]
    for block, rate in zip(blocks, _drop_path_rates(drop_path_rate, len(blocks)), strict=True):
        block.drop_path = DropPath(rate)  # linear from 0 at the first block, as in ConvNeXt
    return model
