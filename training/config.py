"""Training configuration: one frozen dataclass, and presets that are the paper's tables and the official commands."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from model import get_config
from model.convnext import check_head_init_scale, check_layer_scale_init
from model.flops import input_size_refusal
from model.registry import ACTIVATIONS, ModelConfig

from .transforms import INTERPOLATION, check_auto_augment

CROP_MODES = ("center", "squash")
MODEL_KEYS = ("model", "model_ema")


@dataclass(frozen=True)
class TrainConfig:
    """Every knob of a run; `python -m training --help` lists each one as a flag."""

    preset: str = "in1k"
    model: str = "convnext_tiny"
    data_dir: str = ""  # ImageFolder tree with train/ and val/; empty = the offline digits demo data set
    output: str = "runs/train"
    # data
    input_size: int = 224
    crop_pct: float = 0.875  # evaluation: resize to input_size / crop_pct, then crop input_size
    crop_mode: str = "center"  # evaluation: center (short side, aspect kept) | squash (both sides: official >= 384)
    interpolation: str = "bicubic"
    digits_image_px: int = 32  # demo data: 8x8 digits upscaled to this size
    # optimisation (Table 5)
    epochs: int = 300
    warmup_epochs: float = 20.0
    batch_size: int = 128  # per process, per forward pass
    accum_steps: int = 1
    base_lr: float = 4e-3  # at a total batch of `lr_ref_batch` (the recipe's), scaled linearly to the run's
    lr_ref_batch: int = 4096
    min_lr: float = 1e-6
    weight_decay: float = 0.05
    beta1: float = 0.9
    beta2: float = 0.999
    layer_decay: float = 1.0  # < 1: layer-wise lr decay (Table 6); ConvNeXt-S/B/L/XL only, as the official code
    clip_grad: float = 0.0  # 0 = off (the paper does not clip)
    # regularisation (Table 5)
    drop_path: float = 0.1  # stochastic depth; ResNet-50 too (Section 2.1: the modernized recipe)
    layer_scale_init: float | None = None  # None = the model's own (model/registry.py): 1e-6, isotropic S/B 0
    head_init_scale: float = 1.0
    activation: str = ""  # "" = the model's own (gelu; relu for ResNet-50 and the roadmap's ReLU steps) | gelu | relu
    ema_decay: float = 0.9999  # 0 = no EMA; on: EMA evaluated each epoch, checkpoint_best_ema.pth kept
    mixup: float = 0.8
    cutmix: float = 1.0
    label_smoothing: float = 0.1
    auto_augment: str = "rand-m9-mstd0.5-inc1"  # "" = none
    re_prob: float = 0.25
    hflip: float = 0.5
    scale_min: float = 0.08  # RandomResizedCrop scale lower bound
    # runtime
    amp: str = "off"  # bf16 | fp16 | off
    channels_last: bool = False
    compile: bool = False
    workers: int = 4
    seed: int = 0
    disable_eval: bool = False  # no val/ needed, no evaluation, no best checkpoints (official ImageNet-22K runs)
    finetune: str = ""  # checkpoint to start from (head re-initialised on a class-count mismatch)
    model_key: str = "model"  # which weights of --finetune: model | model_ema (official --model_key)
    resume: str = ""  # checkpoint_last.pth to continue (every RNG draw as if never stopped; README: exact on CPU)
    overwrite_checkpoints: bool = False  # a new run into an --output with an earlier run's checkpoints removes them
    max_steps_per_epoch: int = 0  # 0 = the whole epoch (tests and smoke runs use a few)
    log_every: int = 20  # optimizer steps between log.jsonl records (and progress lines when not on a terminal)
    quiet: bool = False  # no progress bar or progress lines (for scripts); epoch records and errors still print

    def total_batch(self, world_size: int) -> int:
        return self.batch_size * self.accum_steps * world_size

    def lr(self, world_size: int) -> float:
        """Peak learning rate, linearly scaled from `lr_ref_batch` (Table 5: 4e-3 at 4096)."""
        return self.base_lr * self.total_batch(world_size) / self.lr_ref_batch

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


IN1K = TrainConfig(preset="in1k")
# Official TRAINING.md: 22K pre-training runs with --disable_eval true (ImageNet-22K has no val split).
IN22K = dataclasses.replace(IN1K, preset="in22k", epochs=90, warmup_epochs=5.0, ema_decay=0.0, drop_path=0.0,
                            disable_eval=True)
FINETUNE = dataclasses.replace(  # Table 6: 22K -> 1K fine-tuning, 30 epochs, no warmup, no mixup/cutmix
    IN1K, preset="finetune", epochs=30, warmup_epochs=0.0, base_lr=5e-5, lr_ref_batch=512, weight_decay=1e-8,
    layer_decay=0.8, mixup=0.0, cutmix=0.0, head_init_scale=0.001, drop_path=0.2, ema_decay=0.0,
)
# Official datasets.py evaluates at >= 384 by warping to 384x384 (no crop); timm's 384 configs: crop_mode "squash".
FINETUNE_384 = dataclasses.replace(FINETUNE, preset="finetune_384", input_size=384, crop_pct=1.0, crop_mode="squash")
# Fine-tuning ImageNet-1K-trained models at 384 (official TRAINING.md): layer decay 0.7, heavy drop path.
FINETUNE_1K_384 = dataclasses.replace(FINETUNE_384, preset="finetune_1k_384", layer_decay=0.7)
# The offline CPU demo: convnext_atto on 32x32 digits; light augmentation (no flips: digits are not symmetric).
DEMO = dataclasses.replace(
    IN1K, preset="demo", model="convnext_atto", output="runs/demo", input_size=32, crop_pct=1.0,
    epochs=30, warmup_epochs=1.0, batch_size=64, base_lr=2e-3, lr_ref_batch=64, ema_decay=0.0, mixup=0.0,
    cutmix=0.0, label_smoothing=0.1, auto_augment="", re_prob=0.0, hflip=0.0, scale_min=0.7, drop_path=0.0,
    workers=0, log_every=10,
)
PRESETS: dict[str, TrainConfig] = {
    c.preset: c for c in (IN1K, IN22K, FINETUNE, FINETUNE_384, FINETUNE_1K_384, DEMO)
}
PRESET_HELP = {
    "in1k": "ImageNet-1K training (Table 5), 300 epochs at total batch 4096",
    "in22k": "ImageNet-22K pre-training (Table 5), 90 epochs at 4096, no evaluation",
    "finetune": "ImageNet-22K -> 1K fine-tuning at 224 (Table 6), 30 epochs at 512",
    "finetune_384": "ImageNet-22K -> 1K fine-tuning at 384 (Table 6), squash evaluation",
    "finetune_1k_384": "ImageNet-1K model -> 384 fine-tuning (official TRAINING.md), layer decay 0.7",
    "demo": "convnext_atto on the offline digits at 32 px (CPU, about a minute)",
}

# Per-model values of each preset: the official TRAINING.md commands and the paper's Tables 5/6, row by row.
# Layer scale is not here: it is the model's own (model/registry.py), as the official commands imply.
_FINETUNE_ROWS = {  # Table 6 / TRAINING.md 22K -> 1K at 224 and 384; XL with --model_ema true --model_ema_eval true
    "convnext_tiny": {"drop_path": 0.0}, "convnext_small": {"drop_path": 0.2}, "convnext_base": {"drop_path": 0.2},
    "convnext_large": {"drop_path": 0.3}, "convnext_xlarge": {"drop_path": 0.4, "ema_decay": 0.9999},
}
MODEL_ROWS: dict[str, dict[str, dict]] = {
    "in1k": {  # Table 5: stochastic depth 0.1/0.4/0.5/0.5 for T/S/B/L
        "convnext_tiny": {"drop_path": 0.1}, "convnext_small": {"drop_path": 0.4},
        "convnext_base": {"drop_path": 0.5}, "convnext_large": {"drop_path": 0.5},
        "convnext_xlarge": {"drop_path": 0.5},  # no official 1K command for XL: the B/L rate
        # TRAINING.md isotropic commands: warmup 50; drop path S 0.1 / B 0.2 / L 0.5 (layer scale 0 / 0 / 1e-6)
        "convnext_isotropic_small": {"drop_path": 0.1, "warmup_epochs": 50.0},
        "convnext_isotropic_base": {"drop_path": 0.2, "warmup_epochs": 50.0},
        "convnext_isotropic_large": {"drop_path": 0.5, "warmup_epochs": 50.0},
        # Section 2.1: the modernized recipe trains ResNet-50 with stochastic depth; no rate is given: ConvNeXt-T's.
        "resnet50": {"drop_path": 0.1},
    },
    "in22k": {  # Table 5 / TRAINING.md: 0.0/0.0/0.1/0.1/0.2 for T/S/B/L/XL
        "convnext_tiny": {"drop_path": 0.0}, "convnext_small": {"drop_path": 0.0},
        "convnext_base": {"drop_path": 0.1}, "convnext_large": {"drop_path": 0.1},
        "convnext_xlarge": {"drop_path": 0.2},
    },
    "finetune": _FINETUNE_ROWS,
    "finetune_384": _FINETUNE_ROWS,
    "finetune_1k_384": {"convnext_base": {"drop_path": 0.8}, "convnext_large": {"drop_path": 0.95}},
}
# Presets whose drop path has no sensible fallback: a model without a row must say --drop-path itself.
ROW_REQUIRED = frozenset({"finetune_1k_384"})
# Official main.py: layer decay "only supports convnext_small/base/large/xlarge" (12 layer ids need stage 3 of 27).
LAYER_DECAY_DEPTHS = (3, 3, 27, 3)


def resolve(preset: str, overrides: dict) -> TrainConfig:
    """The preset, its model's row of the official commands, then explicit overrides; refuses what cannot run."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of: {', '.join(PRESETS)}")
    unknown = set(overrides) - {f.name for f in dataclasses.fields(TrainConfig)}
    if unknown:
        raise ValueError(f"unknown config fields {sorted(unknown)}")
    config = PRESETS[preset]
    model = overrides.get("model", config.model)
    model_cfg = get_config(model)  # raises for an unknown model name
    rows = MODEL_ROWS.get(preset, {})
    if preset in ROW_REQUIRED and model not in rows and "drop_path" not in overrides:
        official = ", ".join(f"{name} ({row['drop_path']})" for name, row in rows.items())
        raise ValueError(f"preset {preset} has official drop-path rates for {official} only; "
                         f"pass --drop-path for {model}")
    config = dataclasses.replace(config, model=model, **rows.get(model, {}))
    config = dataclasses.replace(config, **overrides)
    if model_cfg.family == "resnet":
        config = _resnet_inits(config, overrides)
    _validate(config, model_cfg)
    return config


def _resnet_inits(config: TrainConfig, overrides: dict) -> TrainConfig:
    """ResNet-50 has no layer scale and keeps torchvision's head init (model/resnet.py takes only 0 and 1.0): another
    value asked for is refused, not dropped, and a preset's (finetune's head scale 0.001) is not recorded in the run's
    config.json as if it had applied."""
    asked = [f"--{name.replace('_', '-')} {overrides[name]:g}" for name, inert in (("layer_scale_init", 0.0),
             ("head_init_scale", 1.0)) if overrides.get(name) not in (None, inert)]
    if asked:
        raise ValueError(f"{config.model} has no layer scale and keeps torchvision's head init: {' and '.join(asked)} "
                         f"apply to ConvNeXt models only")
    return dataclasses.replace(config, layer_scale_init=None, head_init_scale=1.0)


def _validate(config: TrainConfig, model_cfg: ModelConfig) -> None:
    family, depths = model_cfg.family, model_cfg.depths
    if config.amp not in ("bf16", "fp16", "off"):
        raise ValueError(f"--amp must be bf16, fp16 or off, got {config.amp!r}")
    if config.accum_steps < 1 or config.batch_size < 1:
        raise ValueError("--batch-size and --accum-steps must be >= 1")
    if config.crop_mode not in CROP_MODES:
        raise ValueError(f"--crop-mode must be one of {', '.join(CROP_MODES)}, got {config.crop_mode!r}")
    if config.model_key not in MODEL_KEYS:
        raise ValueError(f"--model-key must be one of {', '.join(MODEL_KEYS)}, got {config.model_key!r}")
    if not 0.0 < config.layer_decay <= 1.0:
        raise ValueError(f"--layer-decay must be in (0, 1], got {config.layer_decay}")
    if config.layer_decay < 1.0 and (family != "convnext" or tuple(depths) != LAYER_DECAY_DEPTHS):
        raise ValueError(
            f"layer-wise lr decay is defined for ConvNeXt-S/B/L/XL only (stage depths {LAYER_DECAY_DEPTHS}, as the "
            f"official main.py); {config.model} has {tuple(depths)}: pass --layer-decay 1.0")
    if config.activation not in ("", *ACTIVATIONS):
        raise ValueError(f"--activation must be one of {', '.join(ACTIVATIONS)}, got {config.activation!r}")
    if config.epochs < 1 or config.warmup_epochs < 0:
        raise ValueError(f"--epochs must be >= 1 and --warmup-epochs >= 0, got {config.epochs} and "
                         f"{config.warmup_epochs}")
    if config.warmup_epochs > config.epochs:  # the lr would climb all run and never decay (official code: assert)
        raise ValueError(f"--warmup-epochs {config.warmup_epochs:g} is longer than the run's --epochs {config.epochs} "
                         f"(preset {config.preset}): pass --warmup-epochs {config.epochs} or less")
    if config.lr_ref_batch < 1:
        raise ValueError(f"--lr-ref-batch (the total batch --base-lr is given at) must be >= 1, got "
                         f"{config.lr_ref_batch}")
    if config.max_steps_per_epoch < 0:
        raise ValueError(f"--max-steps-per-epoch must be >= 0 (0: the whole epoch), got {config.max_steps_per_epoch}")
    input_refusal = input_size_refusal(config.model, config.input_size)  # the first forward pass would fail
    if input_refusal is not None:
        raise ValueError(input_refusal)
    # (0, 1]: what the exported manifest's preprocess takes; above 1 the evaluation crop would pad the image.
    if not 0.0 < config.crop_pct <= 1.0:
        raise ValueError(f"--crop-pct (the share of the resized image the evaluation crop keeps) must be in (0, 1], "
                         f"got {config.crop_pct}")
    if config.interpolation not in INTERPOLATION:
        raise ValueError(f"--interpolation must be one of {', '.join(INTERPOLATION)}, got {config.interpolation!r}")
    if not 0.0 <= config.label_smoothing < 1.0:
        raise ValueError(f"--label-smoothing must be in [0, 1), got {config.label_smoothing}")
    if not 0.0 <= config.ema_decay < 1.0:
        raise ValueError(f"--ema-decay must be in [0, 1) (0: no EMA), got {config.ema_decay}")
    if config.log_every < 1:
        raise ValueError(f"--log-every must be >= 1 optimizer step, got {config.log_every}")
    check_auto_augment(config.auto_augment)
    if config.drop_path < 0 or config.drop_path >= 1:
        raise ValueError(f"--drop-path must be in [0, 1), got {config.drop_path}")
    # The model's own rules (a negative or NaN layer scale would read as "none"), refused before anything loads.
    check_head_init_scale(config.head_init_scale, name="--head-init-scale")
    if config.layer_scale_init is not None:
        check_layer_scale_init(config.layer_scale_init, name="--layer-scale-init")
    if (config.mixup > 0 or config.cutmix > 0) and config.batch_size % 2:
        raise ValueError(f"Mixup/CutMix mix each batch with itself reversed (timm's batch mode): --batch-size (per "
                         f"process) must be even, got {config.batch_size}")
