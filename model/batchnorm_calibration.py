"""BatchNorm statistics for randomly initialised networks, as training would leave them.

The roadmap's BatchNorm steps share ConvNeXt's init (truncated normal, std .02) and BatchNorm starts with running mean 0
and variance 1, so in eval mode nothing rescales the activations: each convolution shrinks them and the logits of
`roadmap_r50_gelu` come out ~1e-8, below float16's smallest number. An fp16 engine then answers zeros, and a parity
check between precisions compares noise. Estimating the running statistics from a few random batches (what a short
training run does first) gives logits of order 1 without touching a weight; the compute is the same, so timings are
not affected. Only randomly initialised weights get this: trained checkpoints carry their own statistics.
"""
from __future__ import annotations

import torch
from torch import nn

CALIBRATION_BATCHES = 2
CALIBRATION_BATCH_SIZE = 8


def calibrate_batch_norms(module: nn.Module, input_size: int, in_chans: int = 3) -> int:
    """Re-estimate every BatchNorm's running mean and variance on standard-normal inputs (the scale of normalised
    images); the module's weights and train/eval mode are left as they were. Returns how many norms were set."""
    norms = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return 0
    was_training, momenta = module.training, [norm.momentum for norm in norms]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # a cumulative average over the calibration batches
    module.train()
    try:
        with torch.no_grad():
            for _ in range(CALIBRATION_BATCHES):
                module(torch.randn(CALIBRATION_BATCH_SIZE, in_chans, input_size, input_size))
    finally:
        for norm, momentum in zip(norms, momenta, strict=True):
            norm.momentum = momentum
        module.train(was_training)
    return len(norms)
