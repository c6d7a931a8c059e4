"""ConvNeXt (Liu et al., "A ConvNet for the 2020s", 2022): the hierarchical family and the isotropic variant.

Parameter names follow facebookresearch/ConvNeXt, so the official checkpoints load without renaming.
The layout is chosen for clean export: every norm is one `F.layer_norm` over the last (channel) axis, which
ONNX exports as a single LayerNormalization op, and each block transposes only around its channel MLP.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

ACTIVATION_LAYERS = {"gelu": nn.GELU, "relu": nn.ReLU}


def check_layer_scale_init(layer_scale_init: float, name: str = "layer_scale_init") -> None:
    """Refuse a value that would silently drop layer scale: blocks keep it only when `> 0`, which -1e-6 and NaN fail.
    `name`: what the message calls it (training's flag)."""
    if not 0.0 <= layer_scale_init < math.inf:  # NaN fails every comparison
        raise ValueError(f"{name} must be a finite number >= 0 (Table 5: 1e-6; 0: no layer scale), got "
                         f"{layer_scale_init!r}")


def check_head_init_scale(head_init_scale: float, name: str = "head_init_scale") -> None:
    """Refuse a head scale that leaves a NaN, infinite, all-zero or sign-flipped classifier at initialisation."""
    if not 0.0 < head_init_scale < math.inf:
        raise ValueError(f"{name} must be a finite number > 0 (1.0: the usual init; fine-tuning: 0.001), got "
                         f"{head_init_scale!r}")


def activation_layer(name: str) -> type[nn.Module]:
    try:
        return ACTIVATION_LAYERS[name]
    except KeyError:
        raise ValueError(f"unknown activation {name!r}; choose one of: {', '.join(ACTIVATION_LAYERS)}") from None


class DropPath(nn.Module):
    """Stochastic depth (Huang et al., 2016): drop the whole residual branch per sample while training."""

    def __init__(self, drop_prob: float = 0.0):
        super().__init__()
        if not 0.0 <= drop_prob <= 1.0:
            raise ValueError(f"DropPath's drop_prob {drop_prob} is not a probability: pass a value in [0, 1]")
        self.drop_prob = drop_prob

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep_prob = 1.0 - self.drop_prob
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep_prob)
        return x * mask.div_(keep_prob) if keep_prob > 0.0 else x * mask  # 1.0 drops every branch (timm): zeros

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob:.3f}"


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of an (N, C, H, W) tensor: one LayerNormalization op between two transposes."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 2, 3, 1)  # (N, H, W, C)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)  # (N, C, H, W)


class Block(nn.Module):
    """ConvNeXt block (Fig. 4, Table 9): 7x7 dwconv -> LN -> 1x1 (4x) -> act -> 1x1 -> layer scale -> drop path -> +."""

    def __init__(self, dim: int, drop_path: float = 0.0, layer_scale_init: float = 1e-6, activation: str = "gelu"):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, kernel_size=7, padding=3, groups=dim)  # Section 2.5: 7x7 depthwise
        self.norm = nn.LayerNorm(dim, eps=1e-6)  # Section 2.6: one LN per block
        self.pwconv1 = nn.Linear(dim, 4 * dim)  # Section 2.3: inverted bottleneck, 4x expansion
        self.act = activation_layer(activation)()
        self.pwconv2 = nn.Linear(4 * dim, dim)
        self.gamma = nn.Parameter(layer_scale_init * torch.ones(dim)) if layer_scale_init > 0 else None
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x
        x = self.dwconv(x)
        x = x.permute(0, 2, 3, 1)  # (N, C, H, W) -> (N, H, W, C): 1x1 convs are Linear layers on the last axis
        x = self.pwconv2(self.act(self.pwconv1(self.norm(x))))
        if self.gamma is not None:
            x = self.gamma * x
        x = x.permute(0, 3, 1, 2)  # (N, H, W, C) -> (N, C, H, W)
        return shortcut + self.drop_path(x)


def _drop_path_rates(drop_path_rate: float, num_blocks: int) -> list[float]:
    # Stochastic depth grows linearly from 0 at the first block to drop_path_rate at the last.
    if not 0.0 <= drop_path_rate <= 1.0:
        raise ValueError(f"drop_path_rate {drop_path_rate} is not a probability: pass a value in [0, 1]")
    if num_blocks == 1:
        return [0.0]
    return [drop_path_rate * i / (num_blocks - 1) for i in range(num_blocks)]


def _init_weights(module: nn.Module) -> None:
    if isinstance(module, (nn.Conv2d, nn.Linear)):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


def _reset_head(self) -> None:
    """(Re-)initialise the classifier: trunc-normal weights, zero bias, both scaled by head_init_scale (fine-tuning)."""
    _init_weights(self.head)
    with torch.no_grad():
        self.head.weight.mul_(self.head_init_scale)
        self.head.bias.mul_(self.head_init_scale)


def _forward_stages(self, x: torch.Tensor) -> torch.Tensor:
    """Downsample + stage, four times, then global average pool (N, C, H, W) -> (N, C) and the final norm."""
    for downsample, stage in zip(self.downsample_layers, self.stages, strict=True):
        x = stage(downsample(x))
    return self.norm(x.mean(dim=(-2, -1)))


class ConvNeXt(nn.Module):
    """Hierarchical ConvNeXt: patchify stem, four stages with separate downsampling, pooled LN + linear head."""

    def __init__(
        self,
        depths: Sequence[int] = (3, 3, 9, 3),
        dims: Sequence[int] = (96, 192, 384, 768),
        num_classes: int = 1000,
        in_chans: int = 3,
        drop_path_rate: float = 0.0,
        layer_scale_init: float = 1e-6,
        head_init_scale: float = 1.0,
        activation: str = "gelu",
    ):
        super().__init__()
        check_layer_scale_init(layer_scale_init)
        check_head_init_scale(head_init_scale)
        # Section 2.2: "patchify" stem, 4x4 non-overlapping conv + LN.
        stem = nn.Sequential(nn.Conv2d(in_chans, dims[0], kernel_size=4, stride=4), LayerNorm2d(dims[0], eps=1e-6))
        # Section 2.6: separate downsampling layers, LN + 2x2 stride-2 conv, between stages.
        self.downsample_layers = nn.ModuleList(
            [stem]
            + [
                nn.Sequential(LayerNorm2d(dims[i], eps=1e-6), nn.Conv2d(dims[i], dims[i + 1], kernel_size=2, stride=2))
                for i in range(len(dims) - 1)
            ]
        )
        rates = _drop_path_rates(drop_path_rate, sum(depths))
        self.stages = nn.ModuleList()
        for i, depth in enumerate(depths):
            first = sum(depths[:i])
            self.stages.append(
                nn.Sequential(*[Block(dims[i], rates[first + j], layer_scale_init, activation) for j in range(depth)])
            )
        self.norm = nn.LayerNorm(dims[-1], eps=1e-6)  # final norm after global average pooling
        self.head = nn.Linear(dims[-1], num_classes)
        self.head_init_scale = head_init_scale
        self.apply(_init_weights)
        self.reset_head()

    reset_head = _reset_head

    forward_features = _forward_stages

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_features(x))


class ConvNeXtIsotropic(nn.Module):
    """Isotropic ConvNeXt (Section 3.3, Table 2): ViT-style 16x16 patchify stem, one stage, no downsampling."""

    def __init__(
        self,
        depth: int = 18,
        dim: int = 384,
        num_classes: int = 1000,
        in_chans: int = 3,
        drop_path_rate: float = 0.0,
        layer_scale_init: float = 0.0,
        head_init_scale: float = 1.0,
        activation: str = "gelu",
    ):
        super().__init__()
        check_layer_scale_init(layer_scale_init)
        check_head_init_scale(head_init_scale)
        self.stem = nn.Conv2d(in_chans, dim, kernel_size=16, stride=16)
        rates = _drop_path_rates(drop_path_rate, depth)
        self.blocks = nn.Sequential(*[Block(dim, rates[i], layer_scale_init, activation) for i in range(depth)])
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.head = nn.Linear(dim, num_classes)
        self.head_init_scale = head_init_scale
        self.apply(_init_weights)
        self.reset_head()

    reset_head = _reset_head

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(self.stem(x))
        return self.norm(x.mean(dim=(-2, -1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_features(x))
