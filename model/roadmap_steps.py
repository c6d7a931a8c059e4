"""The roadmap's steps as data: Tables 10 (ResNet-50 -> ConvNeXt-T) and 11 (ResNet-200 -> ConvNeXt-B), one per row.

Each row names the model that builds it, the `Design` change it makes, and the paper's figures: ImageNet-1K top-1
(mean +/- std over 3 seeds in Table 10; Table 11 gives no std) and GFLOPs (multiply-accumulates, fvcore). The
tables give no parameter counts. Source: Liu et al., "A ConvNet for the 2020s", arXiv 2201.03545v2, Appendix C.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

from .roadmap import Design

REGIMES = {"r50": "Table 10", "r200": "Table 11"}
KERNEL_SWEEP_LEFT = ("kernel9", "kernel11")  # Section 2.5: "saturates at 7x7"; the roadmap goes on from kernel 7


@dataclass(frozen=True)
class Step:
    """One table row: the registry model that builds it, what changed, and the paper's top-1 and GFLOPs."""

    regime: str  # "r50" | "r200"
    key: str  # unique within the regime
    model: str  # the `create_model` name
    label: str  # the row as the paper prints it
    change: str  # what this row changes (Section 2)
    design: Design
    top1: float
    top1_std: float | None
    gflops: float
    parent: str | None  # the key of the row this one modifies (None for the first)
    recipe: str = "enhanced"  # "enhanced" (Section 2.1: 300 epochs, AdamW, ...) | "original" (row 0)
    gflops_note: str | None = None  # why our count cannot match the paper's GFLOPs, with the arithmetic

    @property
    def on_path(self) -> bool:
        """False for the rows the roadmap tried and left: kernel 9 and 11."""
        return self.key not in KERNEL_SWEEP_LEFT


# Table 10 prints 4.46 GFLOPs for "BN -> LN", 0.31 G above "fewer norms" (4.15), for a change of no conv or linear
# layer; Table 11's same step keeps 14.81 -> 14.81.
BN_TO_LN_NOTE = (
    "BN -> LN swaps a norm and changes no conv or linear layer, so the MACs stay those of 'fewer norms' (Table 10: "
    "4.15). Table 10 prints 4.46: 0.31 G (7.5%) more. LayerNorm itself, even at fvcore's 5 FLOPs per element over "
    "every normalised activation (2,276,736 elements at 224 px), is 0.011 G. Table 11's same step keeps 14.81 -> "
    "14.81. The paper is not self-consistent here; 4.46 is close to the next row, ConvNeXt-T (4.49)."
)

# Sections 2.4-2.6: the same edits in both regimes, in table order: (key, label, change, Design edits).
MICRO_DESIGN = (
    ("inverted", "inverting dimensions", "inverted bottleneck: the 1x1 expands 4x (Section 2.4)",
     dict(inverted=True)),
    ("dwconv_first", "move up depthwise conv", "the depthwise conv moves to the top of the block (Section 2.5)",
     dict(dwconv_first=True)),
    ("kernel5", "kernel size -> 5", "depthwise kernel 3 -> 5 (Section 2.5)", dict(kernel_size=5)),
    ("kernel7", "kernel size -> 7", "depthwise kernel 5 -> 7 (Section 2.5)", dict(kernel_size=7)),
    ("kernel9", "kernel size -> 9", "depthwise kernel 7 -> 9: tried, not kept", dict(kernel_size=9)),
    ("kernel11", "kernel size -> 11", "depthwise kernel 9 -> 11: tried, not kept", dict(kernel_size=11)),
    ("gelu", "ReLU -> GELU", "ReLU -> GELU, on kernel 7 (Section 2.6)", dict(activation="gelu")),
    ("fewer_activations", "fewer activations", "one GELU per block, between the 1x1 convs (Section 2.6)",
     dict(one_activation=True)),
    ("fewer_norms", "fewer norms", "one norm per block, after the depthwise conv (Section 2.6)", dict(one_norm=True)),
    ("layernorm", "BN -> LN", "BatchNorm -> LayerNorm (Section 2.6)", dict(norm="ln")),
    ("separate_downsampling", "separate d.s. conv",
     "2x2/2 downsampling convs between stages; LN after the stem, before each and after pooling (Section 2.6); "
     "layer scale 1e-6 (Table 5)", dict(separate_downsampling=True, layer_scale_init=1e-6)),
)
PARENTS = {"gelu": "kernel7"}  # every other row modifies the row above it


def _micro(figures: list[tuple]) -> list[tuple]:
    """MICRO_DESIGN's rows with their (top1, std, GFLOPs) from one table."""
    return [(*row, figure) for row, figure in zip(MICRO_DESIGN, figures, strict=True)]


def _steps(regime: str, rows: list[tuple], final: str) -> tuple[Step, ...]:
    """Steps from (key, label, change, Design edits) rows and their (top1, std, GFLOPs); each edits its parent."""
    steps: dict[str, Step] = {}
    previous = None
    for key, label, change, edits, (top1, std, gflops) in rows:
        parent = steps[PARENTS[key]] if key in PARENTS else previous
        design = replace(parent.design, **edits) if parent else Design(**edits)
        if key == "separate_downsampling":
            label, change = f"{label} ({final})", f"{change}: exactly {final}"
        note = BN_TO_LN_NOTE if (regime, key) == ("r50", "layernorm") else None
        steps[key] = previous = Step(regime, key, f"roadmap_{regime}_{key}", label, change, design, top1, std, gflops,
                                     parent.key if parent else None, gflops_note=note)
    return tuple(steps.values())


def _with_original_recipe(steps: tuple[Step, ...], model: str, label: str, top1: float) -> tuple[Step, ...]:
    """Row 0: the first architecture trained with its original recipe (same network, same GFLOPs)."""
    first = steps[0]
    row0 = replace(first, key=f"{first.key}_original", model=model, label=label, change="the original recipe",
                   top1=top1, top1_std=None, parent=None, recipe="original")
    return (row0, replace(first, parent=row0.key), *steps[1:])


R50_STEPS = _with_original_recipe(_steps("r50", [
    ("resnet50", "ResNet-50 (enhanced recipe)", "ResNet-50 (torchvision's), the modern recipe (Section 2.1)", {},
     (78.82, 0.07, 4.09)),
    ("stage_ratio", "stage ratio", "blocks per stage (3, 4, 6, 3) -> (3, 3, 9, 3) (Section 2.2)",
     dict(depths=(3, 3, 9, 3)), (79.36, 0.07, 4.53)),
    ("patchify_stem", '"patchify" stem', "7x7/2 conv + max pool -> 4x4/4 conv (Section 2.2)", dict(stem="patchify"),
     (79.51, 0.18, 4.42)),
    ("depthwise", "depthwise conv", "3x3 conv -> depthwise 3x3 (Section 2.3)", dict(depthwise=True),
     (78.28, 0.08, 2.35)),
    ("width96", "increase width", "width 64 -> 96, as Swin-T (Section 2.3)", dict(width=96), (80.50, 0.02, 5.27)),
    *_micro([
        (80.64, 0.03, 4.64), (79.92, 0.08, 4.07), (80.35, 0.08, 4.10), (80.57, 0.14, 4.15), (80.57, 0.06, 4.21),
        (80.47, 0.11, 4.29), (80.62, 0.14, 4.15), (81.27, 0.06, 4.15), (81.41, 0.09, 4.15), (81.47, 0.09, 4.46),
        (81.97, 0.06, 4.49),
    ]),
], "ConvNeXt-T"), "resnet50", "ResNet-50 (PyTorch)", 76.13)

# Appendix C: ResNet-200 is (3, 24, 36, 3); "stage ratio" moves to Swin-B's (3, 3, 27, 3) and widens 64 -> 84 in
# one step to keep the FLOPs; after "depthwise conv" a separate step widens to 128, as Swin-B.
R200_STEPS = _with_original_recipe(_steps("r200", [
    ("resnet200", "ResNet-200 (enhanced recipe)", "ResNet-200 (torchvision's bottleneck), the modern recipe",
     dict(depths=(3, 24, 36, 3)), (81.14, None, 15.01)),
    ("stage_ratio", "stage ratio and increase width", "(3, 24, 36, 3) -> (3, 3, 27, 3), width 64 -> 84",
     dict(depths=(3, 3, 27, 3), width=84), (81.33, None, 14.52)),
    ("patchify_stem", '"patchify" stem', "7x7/2 conv + max pool -> 4x4/4 conv", dict(stem="patchify"),
     (81.59, None, 14.38)),
    ("depthwise", "depthwise conv", "3x3 conv -> depthwise 3x3", dict(depthwise=True), (80.54, None, 7.23)),
    ("width128", "increase width", "width 84 -> 128, as Swin-B", dict(width=128), (81.85, None, 16.76)),
    *_micro([
        (82.64, None, 15.68), (82.04, None, 14.63), (82.32, None, 14.70), (82.30, None, 14.81), (82.27, None, 14.95),
        (82.18, None, 15.13), (82.19, None, 14.81), (82.71, None, 14.81), (83.17, None, 14.81), (83.35, None, 14.81),
        (83.60, None, 15.35),
    ]),
], "ConvNeXt-B"), "roadmap_r200_resnet200", "ResNet-200 [29]", 78.20)

STEPS = {"r50": R50_STEPS, "r200": R200_STEPS}
# Every model the roadmap adds to the registry (row 0 of Table 10 is the registry's own torchvision `resnet50`).
ROADMAP_MODELS: dict[str, Step] = {s.model: s for steps in STEPS.values() for s in steps if s.recipe == "enhanced"}


def step_with_activation(name: str, activation: str) -> str | None:
    """The roadmap model with `name`'s design but `activation` (e.g. the step before "ReLU -> GELU"), or None."""
    try:
        wanted = replace(ROADMAP_MODELS[name].design, activation=activation)
    except ValueError:  # not an activation any design takes
        return None
    return next((model for model, step in ROADMAP_MODELS.items() if step.design == wanted), None)


def steps_of(regime: str) -> tuple[Step, ...]:
    try:
        return STEPS[regime]
    except KeyError:
        raise ValueError(f"unknown regime {regime!r}; choose one of: {', '.join(STEPS)}") from None
