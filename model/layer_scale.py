"""Layer-scale gammas drawn near 1, for randomly initialised networks that check and time engines.

At their init (Table 5: 1e-6) every block's residual branch is scaled by 1e-6, so a random-init ConvNeXt computes
its stem, downsampling layers and head and almost nothing else: the 7x7 depthwise convs, pointwise layers,
activations and block LayerNorms move its logits by ~1e-6 of their scale, below every parity threshold. An export
whose block weights were scrambled then passed its fp32 parity check. With gammas near 1 (what training moves them
towards) every block shapes the logits; the compute is the same, so timings are not affected.
"""
from __future__ import annotations

import torch
from torch import nn

LAYER_SCALE_SPREAD = 0.1  # gamma = 1 + 0.1 * N(0, 1): near 1, and no two channels alike


def is_layer_scale(name: str) -> bool:
    """Whether parameter `name` is a layer-scale gamma: ours and timm's (`gamma`), torchvision's (`layer_scale`)."""
    return name.rsplit(".", 1)[-1] in ("gamma", "layer_scale")


def draw_layer_scales(module: nn.Module, generator: torch.Generator | None = None) -> int:
    """Set every layer-scale gamma of `module` to 1 + 0.1 * N(0, 1), drawn from `generator` (torch's default one when
    None); nothing else is touched. Returns how many were set (0 for a network without layer scale)."""
    gammas = [p for name, p in module.named_parameters() if is_layer_scale(name)]
    with torch.no_grad():
        for gamma in gammas:
            gamma.copy_(1.0 + LAYER_SCALE_SPREAD * torch.randn(gamma.shape, generator=generator))
    return len(gammas)
