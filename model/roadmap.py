"""The modernization roadmap (Section 2, Fig. 2): one configurable network from ResNet-50 to ConvNeXt-T.

`Design` is one point of the paper's design space; each roadmap step (model/roadmap_steps.py, Tables 10 and 11)
changes one field of the step before it. `RoadmapNet(design)` builds any point: the ResNet-50 of torchvision at
the start, exactly `ConvNeXt` (same state-dict names, shapes and outputs) at the end. Module names are ConvNeXt's
(`downsample_layers`, `stages`, `dwconv`, `norm`, `pwconv1`, `act`, `pwconv2`, `gamma`, `head`) so that an
official checkpoint loads into the last step.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import nn

from .convnext import (
    ACTIVATION_LAYERS,
    DropPath,
    LayerNorm2d,
    _drop_path_rates,
    _forward_stages,
    _init_weights,
    _reset_head,
    check_head_init_scale,
    check_layer_scale_init,
)

STEMS = ("resnet", "patchify")
NORMS = ("bn", "ln")


@dataclass(frozen=True)
class Design:
    """One network of Section 2's design space (defaults: ResNet-50, torchvision's definition)."""

    depths: tuple[int, ...] = (3, 4, 6, 3)  # Section 2.2: blocks per stage ("stage compute ratio")
    width: int = 64  # channels of the first stage's spatial conv; x2 per stage (Section 2.3: 96, as Swin-T)
    stem: str = "resnet"  # Section 2.2: "resnet" (7x7/2 conv, norm, act, 3x3/2 max pool) | "patchify" (4x4/4 conv)
    depthwise: bool = False  # Section 2.3: the spatial conv is depthwise (groups = channels)
    inverted: bool = False  # Section 2.4: inverted bottleneck, the block's hidden layer is 4x its output
    dwconv_first: bool = False  # Section 2.5: the spatial conv moves to the top of the block
    kernel_size: int = 3  # Section 2.5: spatial kernel
    activation: str = "relu"  # Section 2.6
    one_activation: bool = False  # Section 2.6: one activation per block, between the two 1x1 convs
    one_norm: bool = False  # Section 2.6: one norm per block, after the spatial conv
    norm: str = "bn"  # Section 2.6: "bn" (BatchNorm) | "ln" (LayerNorm over channels)
    separate_downsampling: bool = False  # Section 2.6: 2x2/2 convs between stages, LN after stem/before each/after pool
    layer_scale_init: float = 0.0  # ConvNeXt's 1e-6 (Table 5); the roadmap's intermediate runs used none

    def __post_init__(self) -> None:
        if self.stem not in STEMS or self.norm not in NORMS or self.activation not in ACTIVATION_LAYERS:
            raise ValueError(f"stem {self.stem!r}, norm {self.norm!r}, activation {self.activation!r}: choose from "
                             f"{STEMS}, {NORMS}, {tuple(ACTIVATION_LAYERS)}")
        if not self.depths or min(self.depths) < 1 or self.width < 1:
            raise ValueError(f"depths {self.depths} and width {self.width} must be positive")
        if self.kernel_size < 1 or self.kernel_size % 2 == 0:
            raise ValueError(f"kernel_size {self.kernel_size} must be odd ('same' padding keeps the feature map size)")
        if self.dwconv_first and not self.inverted:
            raise ValueError("dwconv_first moves the spatial conv up an inverted bottleneck: set inverted=True too")
        if self.one_norm and not self.dwconv_first:
            raise ValueError("one_norm keeps the norm after the spatial conv at the top of the block: set dwconv_first")
        if self.norm == "ln" and not self.one_norm:
            raise ValueError("norm='ln' builds ConvNeXt's channels-last block (one LN, then Linear layers): "
                             "set one_norm=True (and so dwconv_first, inverted)")
        check_layer_scale_init(self.layer_scale_init)

    @property
    def stage_dims(self) -> tuple[int, ...]:
        """Output channels of each stage: a bottleneck outputs 4x its spatial width, an inverted one 1x."""
        expansion = 1 if self.inverted else 4
        return tuple(expansion * self.width * 2**i for i in range(len(self.depths)))

    def with_options(self, *, activation: str | None = None, layer_scale_init: float | None = None) -> Design:
        """This design with create_model's options applied: layer scale is free, the activation is the design's."""
        if activation is not None and activation != self.activation:
            raise ValueError(f"this roadmap step is defined with {self.activation}; the activation is one of the "
                             "steps the roadmap varies")
        return self if layer_scale_init is None else replace(self, layer_scale_init=layer_scale_init)


def norm2d(kind: str, channels: int) -> nn.Module:
    """A norm over the channels of an (N, C, H, W) tensor."""
    return nn.BatchNorm2d(channels) if kind == "bn" else LayerNorm2d(channels, eps=1e-6)


class Block(nn.Module):
    """A residual block anywhere from the ResNet bottleneck (Fig. 3a) to the ConvNeXt block (Fig. 4).

    Order: pwconv1 -> dwconv -> pwconv2, or dwconv -> pwconv1 -> pwconv2 once the spatial conv moves up. `dwconv`
    keeps ConvNeXt's name in every step: it is a dense 3x3 in the three ResNet steps before it turns depthwise.
    `norm` follows dwconv, norm1 and norm2 follow pwconv1 and pwconv2. A BN block runs in (N, C, H, W) with 1x1
    convs (BN folds into them at export); an LN block is ConvNeXt's: Linear layers and LN on the channels-last axis.
    """

    def __init__(self, d: Design, in_dim: int, out_dim: int, stride: int, drop_path: float):
        super().__init__()
        self.dwconv_first, self.channels_last = d.dwconv_first, d.norm == "ln"
        hidden = 4 * out_dim if d.inverted else out_dim // 4  # Section 2.4: expand 4x / ResNet: squeeze 4x
        spatial = in_dim if d.dwconv_first else hidden
        bn = d.norm == "bn"  # a conv followed by BatchNorm needs no bias
        self.dwconv = nn.Conv2d(spatial, spatial, d.kernel_size, stride, d.kernel_size // 2,
                                groups=spatial if d.depthwise else 1, bias=not bn)
        self.norm = nn.LayerNorm(spatial, eps=1e-6) if self.channels_last else norm2d(d.norm, spatial)
        if self.channels_last:  # ConvNeXt: 1x1 convs are Linear layers on the last (channel) axis
            self.pwconv1, self.pwconv2 = nn.Linear(in_dim, hidden), nn.Linear(hidden, out_dim)
        else:
            self.pwconv1 = nn.Conv2d(spatial if d.dwconv_first else in_dim, hidden, 1, bias=not bn or d.one_norm)
            self.pwconv2 = nn.Conv2d(hidden, out_dim, 1, bias=not bn or d.one_norm)
        self.norm1 = nn.Identity() if d.one_norm else norm2d(d.norm, hidden)
        self.norm2 = nn.Identity() if d.one_norm else norm2d(d.norm, out_dim)
        act = ACTIVATION_LAYERS[d.activation]
        self.act = act()  # the one activation Section 2.6 keeps: after the block's second conv
        self.early_act = nn.Identity() if d.one_activation else act()  # after the first conv
        self.out_act = nn.Identity() if d.one_activation else act()  # after the residual sum
        self.gamma = nn.Parameter(d.layer_scale_init * torch.ones(out_dim)) if d.layer_scale_init > 0 else None
        self.drop_path = DropPath(drop_path)
        self.shortcut = None  # torchvision's `downsample`: a 1x1 projection where the block changes shape
        if stride != 1 or in_dim != out_dim:
            self.shortcut = nn.Sequential(nn.Conv2d(in_dim, out_dim, 1, stride, bias=not bn), norm2d(d.norm, out_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.shortcut is None else self.shortcut(x)
        if self.channels_last:
            x = self.dwconv(x).permute(0, 2, 3, 1)  # (N, C, H, W) -> (N, H, W, C)
            x = self.pwconv2(self.act(self.pwconv1(self.early_act(self.norm(x)))))
            x = (x if self.gamma is None else self.gamma * x).permute(0, 3, 1, 2)  # -> (N, C, H, W)
        else:
            if self.dwconv_first:
                x = self.early_act(self.norm(self.dwconv(x)))
                x = self.act(self.norm1(self.pwconv1(x)))
            else:
                x = self.early_act(self.norm1(self.pwconv1(x)))
                x = self.act(self.norm(self.dwconv(x)))
            x = self.norm2(self.pwconv2(x))
            x = x if self.gamma is None else self.gamma[:, None, None] * x
        return self.out_act(identity + self.drop_path(x))


def stem(d: Design, in_chans: int) -> nn.Sequential:
    if d.stem == "resnet":  # torchvision's ResNet stem: 4x downsampling in two steps
        return nn.Sequential(nn.Conv2d(in_chans, d.width, 7, 2, 3, bias=False), norm2d(d.norm, d.width),
                             ACTIVATION_LAYERS[d.activation](), nn.MaxPool2d(3, 2, 1))
    patchify = nn.Conv2d(in_chans, d.width, kernel_size=4, stride=4)  # Section 2.2: 4x4 non-overlapping patches
    return nn.Sequential(patchify, norm2d(d.norm, d.width)) if d.separate_downsampling else nn.Sequential(patchify)


class RoadmapNet(nn.Module):
    """Stem, four stages of `Block`s, pooled (norm +) linear head; downsampling inside blocks or between stages."""

    def __init__(self, design: Design, num_classes: int = 1000, in_chans: int = 3, drop_path_rate: float = 0.0,
                 head_init_scale: float = 1.0):
        super().__init__()
        check_head_init_scale(head_init_scale)
        d, dims = design, design.stage_dims
        self.design = design
        # Stage transitions: a stride-2 first block (ResNet), or Section 2.6's norm + 2x2/2 conv between stages.
        self.downsample_layers = nn.ModuleList([stem(d, in_chans)] + [
            nn.Sequential(norm2d(d.norm, dims[i - 1]), nn.Conv2d(dims[i - 1], dims[i], kernel_size=2, stride=2))
            if d.separate_downsampling else nn.Identity()
            for i in range(1, len(dims))
        ])
        rates = iter(_drop_path_rates(drop_path_rate, sum(d.depths)))
        self.stages = nn.ModuleList()
        in_dim = d.width
        for i, (depth, dim) in enumerate(zip(d.depths, dims, strict=True)):
            in_dim = dim if d.separate_downsampling and i > 0 else in_dim
            stride = 2 if i > 0 and not d.separate_downsampling else 1
            blocks = [Block(d, in_dim if j == 0 else dim, dim, stride if j == 0 else 1, next(rates))
                      for j in range(depth)]
            self.stages.append(nn.Sequential(*blocks))
            in_dim = dim
        self.norm = nn.LayerNorm(dims[-1], eps=1e-6) if d.separate_downsampling else nn.Identity()  # after pooling
        self.head = nn.Linear(dims[-1], num_classes)
        self.head_init_scale = head_init_scale
        self.apply(_init_weights)
        self.reset_head()

    reset_head = _reset_head

    forward_features = _forward_stages  # the norm after pooling is Identity before separate downsampling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_features(x))
