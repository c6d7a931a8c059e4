"""Model names -> architecture and evaluation-data configs (configs as data, beside the code that uses them)."""
from __future__ import annotations

from dataclasses import dataclass, field

from .roadmap_steps import ROADMAP_MODELS

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
ACTIVATIONS = ("gelu", "relu")


@dataclass(frozen=True)
class DataConfig:
    """The evaluation transform: resize to input_size / crop_pct, center-crop input_size, normalize.

    crop_mode "center" resizes the short side (aspect kept); "squash" resizes both sides (timm's squash; with
    crop_pct 1.0 the official ConvNeXt evaluation at 384: warp to 384x384, no crop).
    """

    input_size: int = 224
    crop_pct: float = 0.875
    interpolation: str = "bicubic"
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    in_chans: int = 3
    crop_mode: str = "center"

    @property
    def resize_px(self) -> int:
        # timm / official ConvNeXt eval: scale_size = int(input_size / crop_pct)
        return int(self.input_size / self.crop_pct)


@dataclass(frozen=True)
class PaperFigures:
    """Params (millions) and GFLOPs (multiply-accumulates) as the paper reports them."""

    params_m: float
    gflops: float
    source: str
    input_size_px: int = 224


@dataclass(frozen=True)
class ModelConfig:
    name: str
    family: str  # "convnext" | "convnext_isotropic" | "resnet" | "roadmap"
    depths: tuple[int, ...]
    dims: tuple[int, ...]
    layer_scale_init: float = 1e-6  # Table 5: layer scale 1e-6
    default_activation: str = "gelu"
    data: DataConfig = field(default_factory=DataConfig)
    paper: PaperFigures | None = None
    paper_high_res: PaperFigures | None = None  # the same model evaluated at 384^2 (Table 1), where reported

    @property
    def total_stride_px(self) -> int:
        """Input px per px of the last feature map: the smallest input side the model runs on."""
        # Section 3.3: isotropic = one 16x16 patchify; else a 4x stem (or ResNet's conv + pool) and three 2x stages.
        return 16 if self.family == "convnext_isotropic" else 32

    def paper_figures(self) -> tuple[PaperFigures, ...]:
        """Every (input size, params, GFLOPs) row the paper reports for this model."""
        return tuple(f for f in (self.paper, self.paper_high_res) if f is not None)


def _convnext(name, depths, dims, paper=None, **kw) -> ModelConfig:
    return ModelConfig(name, "convnext", depths, dims, paper=paper, **kw)


def _isotropic(name, depth, dim, paper, layer_scale_init=0.0) -> ModelConfig:
    # Section 3.3 / official TRAINING.md: layer scale 0 for isotropic S/B (--layer_scale_init_value 0), 1e-6 for L.
    return ModelConfig(name, "convnext_isotropic", (depth,), (dim,), layer_scale_init=layer_scale_init, paper=paper)


MODEL_CONFIGS: dict[str, ModelConfig] = {
    cfg.name: cfg
    for cfg in (
        # Section 3 / Table 1 (ImageNet-1K, 224^2).
        _convnext("convnext_tiny", (3, 3, 9, 3), (96, 192, 384, 768), PaperFigures(28.6, 4.5, "Table 1")),
        _convnext("convnext_small", (3, 3, 27, 3), (96, 192, 384, 768), PaperFigures(50.0, 8.7, "Table 1")),
        _convnext(
            "convnext_base", (3, 3, 27, 3), (128, 256, 512, 1024), PaperFigures(89.0, 15.4, "Table 1"),
            paper_high_res=PaperFigures(89.0, 45.0, "Table 1", input_size_px=384),
        ),
        _convnext(
            "convnext_large", (3, 3, 27, 3), (192, 384, 768, 1536), PaperFigures(198.0, 34.4, "Table 1"),
            paper_high_res=PaperFigures(198.0, 101.0, "Table 1", input_size_px=384),
        ),
        _convnext("convnext_xlarge", (3, 3, 27, 3), (256, 512, 1024, 2048), PaperFigures(350.0, 60.9, "Table 1")),
        # Community variants for edge/CPU (timm's atto..nano), used for fast tests and the CPU demo.
        _convnext("convnext_atto", (2, 2, 6, 2), (40, 80, 160, 320)),
        _convnext("convnext_femto", (2, 2, 6, 2), (48, 96, 192, 384)),
        _convnext("convnext_pico", (2, 2, 6, 2), (64, 128, 256, 512)),
        _convnext("convnext_nano", (2, 2, 8, 2), (80, 160, 320, 640)),
        # Section 3.3 / Table 2: isotropic ConvNeXt (16x16 patchify, no downsampling).
        _isotropic("convnext_isotropic_small", 18, 384, PaperFigures(22.0, 4.3, "Table 2")),
        _isotropic("convnext_isotropic_base", 18, 768, PaperFigures(87.0, 16.9, "Table 2")),
        _isotropic("convnext_isotropic_large", 36, 1024, PaperFigures(306.0, 59.7, "Table 2"), layer_scale_init=1e-6),
        # Table 9: the ResNet-50 baseline (torchvision's definition).
        ModelConfig(
            "resnet50", "resnet", (3, 4, 6, 3), (256, 512, 1024, 2048),
            layer_scale_init=0.0, default_activation="relu",
            data=DataConfig(interpolation="bilinear"),
            paper=PaperFigures(25.6, 4.1, "Table 9"),
        ),
    )
}


# The modernization roadmap (Tables 10 and 11), one model per step; kept apart from the families above, their paper
# figures live with the steps (model/roadmap_steps.py; `python -m model roadmap`).
ROADMAP_CONFIGS: dict[str, ModelConfig] = {
    name: ModelConfig(name, "roadmap", step.design.depths, step.design.stage_dims,
                      layer_scale_init=step.design.layer_scale_init, default_activation=step.design.activation)
    for name, step in ROADMAP_MODELS.items()
}


def list_models() -> list[str]:
    """Every model name `create_model` accepts."""
    return sorted({**MODEL_CONFIGS, **ROADMAP_CONFIGS})


def get_config(name: str) -> ModelConfig:
    try:
        return MODEL_CONFIGS[name] if name in MODEL_CONFIGS else ROADMAP_CONFIGS[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; choose one of: {', '.join(list_models())}") from None
