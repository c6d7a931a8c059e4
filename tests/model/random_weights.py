"""Random weights in which no two blocks are alike, for tests that compare networks or the tensors loaded into them.

At init every ConvNeXt block's layer-scale gamma is 1e-6 (Table 5), its LayerNorm 1 and 0 and its biases 0: a tensor
loaded into another block's place compared equal, and the blocks barely shaped the logits compared.
"""
from __future__ import annotations

import torch

from model import draw_layer_scales


def randomise(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Noise (std 0.1) in every parameter and floating-point buffer, norm scales and BatchNorm variances near 1, and
    layer-scale gammas near 1 (ours, timm's `gamma`, torchvision's `layer_scale`), all drawn from `seed`."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for tensor in list(module.parameters()) + [b for b in module.buffers() if b.is_floating_point()]:
            noise = torch.randn(tensor.shape, generator=generator) * 0.1
            tensor.copy_(noise + 1.0 if tensor.ndim == 1 and tensor.min() >= 0.999 else noise)  # norm scales, BN var
    draw_layer_scales(module, generator)
    return module.eval()
