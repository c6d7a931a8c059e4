"""Exponential moving average of the weights (Table 5: EMA 0.9999), kept on the training device."""
from __future__ import annotations

import copy

import torch
from torch import nn


class ModelEma:
    """ema = decay * ema + (1 - decay) * model, for floating tensors; buffers of other types are copied."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.module = copy.deepcopy(model).eval()
        for param in self.module.parameters():
            param.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """`model` is the module under DDP (compiled in place with --compile: its state_dict keeps plain names)."""
        for ema_value, value in zip(self.module.state_dict().values(), model.state_dict().values(), strict=True):
            if ema_value.dtype.is_floating_point:
                ema_value.lerp_(value.detach(), 1.0 - self.decay)
            else:
                ema_value.copy_(value)

    def state_dict(self) -> dict:
        return self.module.state_dict()

    def load_state_dict(self, state_dict: dict) -> None:
        self.module.load_state_dict(state_dict, strict=True)
