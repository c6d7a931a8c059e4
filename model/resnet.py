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
           drop_path_rate: float = 0.0, in_chans: int = 3, *, layer_scale_init: float = 0.0,
           head_init_scale: float = 1.0) -> nn.Module:
    """torchvision's ResNet of `depths`; it has no layer scale and keeps nn.Linear's own head init, so those
    ConvNeXt options are refused rather than ignored."""
    if activation != "relu":
        raise ValueError(f"the ResNet baseline is defined with ReLU only, got activation={activation!r}")
    if layer_scale_init != 0.0:
        raise ValueError(f"the ResNet baseline has no layer scale, got layer_scale_init={layer_scale_init!r}; "
                         "leave layer_scale_init unset (or 0) for ResNet models")
    if head_init_scale != 1.0:
        raise ValueError(f"the ResNet baseline keeps torchvision's head init, got head_init_scale={head_init_scale!r}; "
                         "leave head_init_scale at 1.0 for ResNet models")
    model = ResNet(StochasticDepthBottleneck, list(depths), num_classes=num_classes)
    if in_chans != 3:  # torchvision's stem conv takes RGB only: the same 7x7/2 conv for `in_chans` channels
        model.conv1 = nn.Conv2d(in_chans, model.conv1.out_channels, kernel_size=7, stride=2, padding=3, bias=False)
        nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")  # torchvision's init
    blocks = [block for layer in (model.layer1, model.layer2, model.layer3, model.layer4) for block in layer]
    for block, rate in zip(blocks, _drop_path_rates(drop_path_rate, len(blocks)), strict=True):
        block.drop_path = DropPath(rate)  # linear from 0 at the first block, as in ConvNeXt
    return model
