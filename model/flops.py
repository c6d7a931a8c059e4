"""Params and multiply-accumulates (MACs, what the paper calls FLOPs) of a model, counted as fvcore does.

The paper's "FLOPs" are fvcore counts: one per multiply-accumulate of convolutions and matrix products (linear
layers). Norms and element-wise ops add under 0.3% for these models, so convs + matmuls alone land within 1% of
every figure in Tables 1, 2 and 9; we count exactly those, with PyTorch's own FlopCounterMode (2 FLOPs per MAC).
Models are built on the meta device, so even ConvNeXt-XL costs no memory and no time to count.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from .factory import create_model
from .registry import get_config


@dataclass(frozen=True)
class ModelCost:
    name: str
    input_size_px: int
    params: int
    macs: int

    @property
    def params_m(self) -> float:
        return self.params / 1e6

    @property
    def gmacs(self) -> float:
        return self.macs / 1e9


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def count_macs(model: nn.Module, input_size_px: int, in_chans: int = 3) -> int:
    """Multiply-accumulates of one forward pass of one image (on the model's device; meta works)."""
    device = next(model.parameters()).device
    x = torch.empty(1, in_chans, input_size_px, input_size_px, device=device)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model.eval()(x)
    return counter.get_total_flops() // 2


def input_size_refusal(name: str, input_size_px: int) -> str | None:
    """What `--input-size` of the export and of training says when `name` cannot run on it (below its total stride,
    its last feature map would be empty), or None."""
    stride_px = get_config(name).total_stride_px
    if input_size_px >= stride_px:
        return None
    return (f"--input-size {input_size_px} is too small for {name}, which downsamples its input {stride_px}x: pass "
            f"--input-size {stride_px} or more")


def check_input_size(name: str, input_size_px: int) -> None:
    """Raise ValueError unless `name` runs on a square input of `input_size_px` (at least its total stride)."""
    stride_px = get_config(name).total_stride_px
    if input_size_px < stride_px:
        raise ValueError(f"input size {input_size_px} px is too small for {name}, which downsamples {stride_px}x: "
                         f"pass at least {stride_px}")


def measure(name: str, input_size_px: int | None = None, **model_kwargs) -> ModelCost:
    """Params and MACs of `create_model(name, **model_kwargs)` at `input_size_px` (default: the model's own)."""
    input_size_px = get_config(name).data.input_size if input_size_px is None else input_size_px
    check_input_size(name, input_size_px)
    with torch.device("meta"):
        model = create_model(name, **model_kwargs)
    in_chans = model_kwargs.get("in_chans", 3)
    return ModelCost(name, input_size_px, count_params(model), count_macs(model, input_size_px, in_chans))


def relative_error(measured: float, reported: float) -> float:
    return (measured - reported) / reported


def within_paper_rounding(measured: float, reported: float, tolerance: float = 0.01) -> bool:
    """Within `tolerance` (1%) of the paper, or rounds to the figure as printed (e.g. 22.3M is the paper's "22M")."""
    decimals = len(f"{reported:g}".partition(".")[2])
    return abs(relative_error(measured, reported)) <= tolerance or round(measured, decimals) == reported
