"""One factory for every model: name + options -> nn.Module, optionally with weights from a checkpoint."""
from __future__ import annotations

from pathlib import Path

from torch import nn

from .checkpoints import load_checkpoint
from .convnext import ConvNeXt, ConvNeXtIsotropic, check_layer_scale_init
from .registry import get_config
from .resnet import resnet
from .roadmap import Design, RoadmapNet
from .roadmap_steps import ROADMAP_MODELS, step_with_activation


def create_model(
    name: str,
    *,
    num_classes: int = 1000,
    drop_path_rate: float = 0.0,
    layer_scale_init: float | None = None,
    head_init_scale: float = 1.0,
    activation: str | None = None,
    in_chans: int = 3,
    checkpoint: str | Path | None = None,
) -> nn.Module:
    """Build `name` (see `list_models()`); `None` options take the model's own defaults from the registry.

    `checkpoint` loads weights strictly (official, timm, torchvision or this project's format); a checkpoint
    with another class count re-initialises only the head. ResNet-50 (torchvision's) has no layer scale and keeps its
    own head init: a layer_scale_init other than 0, or a head_init_scale other than 1.0, raises ValueError for it.
    The module's `model_name` is `name`: load_checkpoint names a checkpoint of another model by it.
    """
    cfg = get_config(name)
    activation = activation or cfg.default_activation
    layer_scale_init = cfg.layer_scale_init if layer_scale_init is None else layer_scale_init
    model: nn.Module
    if cfg.family == "convnext":
        model = ConvNeXt(
            cfg.depths, cfg.dims, num_classes, in_chans, drop_path_rate, layer_scale_init, head_init_scale, activation
        )
    elif cfg.family == "convnext_isotropic":
        model = ConvNeXtIsotropic(
            cfg.depths[0], cfg.dims[0], num_classes, in_chans, drop_path_rate, layer_scale_init, head_init_scale,
            activation,
        )
    elif cfg.family == "roadmap":
        design = roadmap_design(name, activation, layer_scale_init)
        model = RoadmapNet(design, num_classes, in_chans, drop_path_rate, head_init_scale)
    else:
        model = resnet(cfg.depths, num_classes, activation, drop_path_rate, in_chans,
                       layer_scale_init=layer_scale_init, head_init_scale=head_init_scale)
    model.model_name = name  # what load_checkpoint compares a checkpoint's model_name with, to name a wrong model first
    if checkpoint is not None:
        load_checkpoint(model, checkpoint)
    return model


def roadmap_design(name: str, activation: str, layer_scale_init: float) -> Design:
    """A roadmap step's design with create_model's options. The activation is one of the things the roadmap varies,
    so another one is refused, naming the step that has it."""
    check_layer_scale_init(layer_scale_init)  # here, not in the try: naming a step with the activation is no help
    try:
        return ROADMAP_MODELS[name].design.with_options(activation=activation, layer_scale_init=layer_scale_init)
    except ValueError as err:
        other = step_with_activation(name, activation)
        where = f"the step with {activation} is {other}" if other else f"no step has this design with {activation}"
        raise ValueError(f"{err}; {where}") from None
