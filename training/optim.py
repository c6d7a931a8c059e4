"""Optimizer parameter groups (no weight decay on 1-D params, layer-wise lr decay) and the per-step lr schedule."""
from __future__ import annotations

import math

import torch
from torch import nn

CONVNEXT_MAX_LAYER_ID = 12  # official optim_factory: stem 0, stages 1..11, last stage 12, head 13


def lr_at_step(step: int, peak_lr: float, warmup_steps: int, total_steps: int, min_lr: float = 0.0) -> float:
    """Linear warmup from 0 to `peak_lr` over `warmup_steps`, then cosine down to `min_lr` at `total_steps`."""
    if step < warmup_steps:
        return peak_lr * step / warmup_steps
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return min_lr + 0.5 * (peak_lr - min_lr) * (1.0 + math.cos(math.pi * progress))


def convnext_layer_id(param_name: str) -> int:
    """Layer id as in the official optim_factory: every 3 consecutive blocks of stage 3 share one id."""
    parts = param_name.split(".")
    if parts[0] == "downsample_layers":
        stage = int(parts[1])
        return {0: 0, 1: 2, 2: 3, 3: CONVNEXT_MAX_LAYER_ID}[stage]
    if parts[0] == "stages":
        stage, block = int(parts[1]), int(parts[2])
        return {0: 1, 1: 2, 2: 3 + block // 3, 3: CONVNEXT_MAX_LAYER_ID}[stage]
    return CONVNEXT_MAX_LAYER_ID + 1  # final norm and head


def _has_official_layer_ids(model: nn.Module) -> bool:
    """Stage depths 3/3/27/3: the 12 layer ids of the official optim_factory cover the model without a gap."""
    stages = getattr(model, "stages", None)
    return hasattr(model, "downsample_layers") and [len(stage) for stage in stages] == [3, 3, 27, 3]


def param_groups(model: nn.Module, weight_decay: float, layer_decay: float = 1.0) -> list[dict]:
    """AdamW groups: 1-D params (biases, norms, layer-scale gammas) get no weight decay; `lr_scale` per layer."""
    use_layer_decay = layer_decay < 1.0
    if use_layer_decay and not _has_official_layer_ids(model):
        raise ValueError("layer-wise lr decay is defined for ConvNeXt-S/B/L/XL only (stage depths 3/3/27/3, as the "
                         "official main.py: fewer blocks leave a jump in the layer ids); use --layer-decay 1.0")
    groups: dict[tuple[int, bool], dict] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        no_decay = param.ndim <= 1 or name.endswith(".gamma")
        layer_id = convnext_layer_id(name) if use_layer_decay else 0
        scale = layer_decay ** (CONVNEXT_MAX_LAYER_ID + 1 - layer_id) if use_layer_decay else 1.0
        group = groups.setdefault(
            (layer_id, no_decay),
            {"params": [], "names": [], "weight_decay": 0.0 if no_decay else weight_decay, "lr_scale": scale,
             "layer_id": layer_id},
        )
        group["params"].append(param)
        group["names"].append(name)
    return list(groups.values())


def create_optimizer(model: nn.Module, lr: float, weight_decay: float, betas, layer_decay: float):
    groups = param_groups(model, weight_decay, layer_decay)
    for group in groups:
        del group["names"]
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), weight_decay=weight_decay)


def peak_lr(optimizer: torch.optim.Optimizer) -> float:
    """The schedule's learning rate: the largest group's (with layer-wise decay, the head's; the stem's group runs
    at decay^13 of it)."""
    return max(group["lr"] for group in optimizer.param_groups)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
