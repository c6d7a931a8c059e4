"""Training configuration: one frozen dataclass, and presets that are the paper's tables as data."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

# Table 5 (ImageNet-1K training): stochastic depth 0.1/0.4/0.5/0.5 for T/S/B/L. The official README trains XL only
# on ImageNet-22K; its 1K recipe is the B/L one. Variants not in the paper (atto..nano) follow timm's 0.1.
DROP_PATH_IN1K = {
    "convnext_tiny": 0.1, "convnext_small": 0.4, "convnext_base": 0.5, "convnext_large": 0.5, "convnext_xlarge": 0.5,
}
# Table 5 (ImageNet-22K pre-training): stochastic depth 0.0/0.0/0.1/0.1/0.2 for T/S/B/L/XL.
DROP_PATH_IN22K = {
    "convnext_tiny": 0.0, "convnext_small": 0.0, "convnext_base": 0.1, "convnext_large": 0.1, "convnext_xlarge": 0.2,
}
# Table 6 (ImageNet-22K -> 1K fine-tuning): stochastic depth 0.0/0.2/0.2/0.3/0.4 (official README: B 0.2, L 0.3,
# XL 0.4 at 384).
DROP_PATH_FINETUNE = {
    "convnext_tiny": 0.0, "convnext_small": 0.2, "convnext_base": 0.2, "convnext_large": 0.3, "convnext_xlarge": 0.4,
}


@dataclass(frozen=True)
class TrainConfig:
    """Every knob of a run; `python -m training --help` lists each one as a flag."""

    preset: str = "in1k"
    model: str = "convnext_tiny"
    data_dir: str = ""  # ImageFolder tree with train/ and val/; empty = the offline digits demo data set
    output: str = "runs/train"
    # data
    input_size: int = 224
    crop_pct: float = 0.875  # evaluation center-crop ratio (1.0 at 384, Section 3 fine-tuning)
    interpolation: str = "bicubic"
    digits_image_px: int = 32  # demo data: 8x8 digits upscaled to this size
    # optimisation (Table 5)
    epochs: int = 300
    warmup_epochs: float = 20.0
    batch_size: int = 128  # per process, per forward pass
    accum_steps: int = 1
    base_lr: float = 4e-3  # at a total batch of `lr_ref_batch`, scaled linearly
    lr_ref_batch: int = 4096
    min_lr: float = 1e-6
    weight_decay: float = 0.05
    beta1: float = 0.9
    beta2: float = 0.999
    layer_decay: float = 1.0  # < 1: layer-wise lr decay (Table 6)
    clip_grad: float = 0.0  # 0 = off (the paper does not clip)
    # regularisation (Table 5)
    drop_path: float = 0.1
    layer_scale_init: float = 1e-6
    head_init_scale: float = 1.0
    ema_decay: float = 0.9999  # 0 = no EMA
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
    finetune: str = ""  # checkpoint to start from (head re-initialised on a class-count mismatch)
    resume: str = ""  # checkpoint_last.pth to continue exactly
    max_steps_per_epoch: int = 0  # 0 = the whole epoch (tests and smoke runs use a few)
    log_every: int = 20

    def total_batch(self, world_size: int) -> int:
        return self.batch_size * self.accum_steps * world_size

    def lr(self, world_size: int) -> float:
        """Peak learning rate, linearly scaled from `lr_ref_batch` (Table 5: 4e-3 at 4096)."""
        return self.base_lr * self.total_batch(world_size) / self.lr_ref_batch

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


IN1K = TrainConfig(preset="in1k")
IN22K = dataclasses.replace(IN1K, preset="in22k", epochs=90, warmup_epochs=5.0, ema_decay=0.0, drop_path=0.0)
FINETUNE = dataclasses.replace(  # Table 6: 22K -> 1K fine-tuning, 30 epochs, no warmup, no mixup/cutmix
    IN1K, preset="finetune", epochs=30, warmup_epochs=0.0, base_lr=5e-5, lr_ref_batch=512, weight_decay=1e-8,
    layer_decay=0.8, mixup=0.0, cutmix=0.0, head_init_scale=0.001, drop_path=0.2, ema_decay=0.0,
)
FINETUNE_384 = dataclasses.replace(FINETUNE, preset="finetune_384", input_size=384, crop_pct=1.0)
# Fine-tuning ImageNet-1K-trained models at 384 (official TRAINING.md): layer decay 0.7, heavy drop path.
FINETUNE_1K_384 = dataclasses.replace(FINETUNE_384, preset="finetune_1k_384", layer_decay=0.7)
DROP_PATH_FINETUNE_1K_384 = {"convnext_base": 0.8, "convnext_large": 0.95}
# The offline CPU demo: convnext_atto on 32x32 digits; light augmentation (no flips: digits are not symmetric).
DEMO = dataclasses.replace(
    IN1K, preset="demo", model="convnext_atto", output="runs/demo", input_size=32, crop_pct=1.0,
    epochs=30, warmup_epochs=1.0, batch_size=64, base_lr=4e-3, lr_ref_batch=128, ema_decay=0.0, mixup=0.0,
    cutmix=0.0, label_smoothing=0.1, auto_augment="", re_prob=0.0, hflip=0.0, scale_min=0.7, drop_path=0.0,
    workers=0, log_every=10,
)
PRESETS: dict[str, TrainConfig] = {
    c.preset: c for c in (IN1K, IN22K, FINETUNE, FINETUNE_384, FINETUNE_1K_384, DEMO)
}
DROP_PATH_BY_PRESET = {"in1k": DROP_PATH_IN1K, "in22k": DROP_PATH_IN22K, "finetune": DROP_PATH_FINETUNE,
                       "finetune_384": DROP_PATH_FINETUNE, "finetune_1k_384": DROP_PATH_FINETUNE_1K_384}


def resolve(preset: str, overrides: dict) -> TrainConfig:
    """The preset, its model's stochastic-depth rate from the paper's table, then explicit overrides."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of: {', '.join(PRESETS)}")
    config = PRESETS[preset]
    model = overrides.get("model", config.model)
    table = DROP_PATH_BY_PRESET.get(preset, {})
    config = dataclasses.replace(config, model=model, drop_path=table.get(model, config.drop_path))
    unknown = set(overrides) - {f.name for f in dataclasses.fields(TrainConfig)}
    if unknown:
        raise ValueError(f"unknown config fields {sorted(unknown)}")
    config = dataclasses.replace(config, **overrides)
    if config.amp not in ("bf16", "fp16", "off"):
        raise ValueError(f"--amp must be bf16, fp16 or off, got {config.amp!r}")
    if config.accum_steps < 1 or config.batch_size < 1:
        raise ValueError("--batch-size and --accum-steps must be >= 1")
    return config
