"""Data sets (ImageFolder tree or the offline digits demo), the training transform, loaders and Mixup/CutMix."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from timm.data import Mixup, create_transform
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset
from torchvision.datasets import ImageFolder

from model.registry import DataConfig

from .config import TrainConfig
from .transforms import eval_transform, with_zero_bit_posterize

DIGITS_VAL_FRACTION = 0.2
DIGITS_SPLIT_SEED = 0


class DigitsDataset(Dataset):
    """scikit-learn's 8x8 digits, upscaled (bicubic) and repeated to RGB so served pictures look the same."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, transform):
        self.images, self.labels, self.transform = images, labels, transform
        self.classes = [str(i) for i in range(10)]

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int):
        return self.transform(Image.fromarray(self.images[index]).convert("RGB")), int(self.labels[index])


def digits_split(image_px: int) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """Fixed seeded stratified 80/20 split of the 1797 digits, as uint8 grayscale images of image_px^2."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    gray = (digits.images * (255.0 / 16.0)).round().astype(np.uint8)
    upscaled = np.stack(
        [np.asarray(Image.fromarray(g).resize((image_px, image_px), Image.BICUBIC)) for g in gray]
    )
    x_train, x_val, y_train, y_val = train_test_split(
        upscaled, digits.target, test_size=DIGITS_VAL_FRACTION, random_state=DIGITS_SPLIT_SEED,
        stratify=digits.target,
    )
    return (x_train, y_train), (x_val, y_val)


def data_config_for(config: TrainConfig, model_data: DataConfig) -> DataConfig:
    """The evaluation DataConfig of this run: the model's mean/std, the run's size, crop and interpolation."""
    return DataConfig(
        input_size=config.input_size, crop_pct=config.crop_pct, interpolation=config.interpolation,
        mean=tuple(model_data.mean), std=tuple(model_data.std), crop_mode=config.crop_mode,
    )


def train_transform(config: TrainConfig, data: DataConfig):
    """timm's training pipeline: RandomResizedCrop, flip, RandAugment, normalize, Random Erasing (Table 5); its
    posterize as the official runs' Pillow did it (training/transforms.py)."""
    return with_zero_bit_posterize(create_transform(
        data.input_size, is_training=True, scale=(config.scale_min, 1.0), hflip=config.hflip,
        auto_augment=config.auto_augment or None, interpolation=config.interpolation,
        mean=data.mean, std=data.std, re_prob=config.re_prob, re_mode="pixel", re_count=1,
    ))


@dataclass
class Datasets:
    train: Dataset
    val: Dataset | None  # None with --disable-eval
    class_names: list[str]


def build_datasets(config: TrainConfig, data: DataConfig, augment: bool = True) -> Datasets:
    train_tf = train_transform(config, data) if augment else eval_transform(data)
    if config.data_dir:
        root = Path(config.data_dir)
        splits = ("train",) if config.disable_eval else ("train", "val")
        for split in splits:
            if not (root / split).is_dir():
                raise FileNotFoundError(f"{root / split} is missing: --data-dir needs train/ and val/ class folders "
                                        "(train/ only with --disable-eval)")
        train = ImageFolder(str(root / "train"), train_tf)
        val = None if config.disable_eval else ImageFolder(str(root / "val"), eval_transform(data))
        if val is not None:
            check_same_classes(train.classes, val.classes, root)
        return Datasets(train, val, list(train.classes))
    (x_train, y_train), (x_val, y_val) = digits_split(config.digits_image_px)
    train = DigitsDataset(x_train, y_train, train_tf)
    val = None if config.disable_eval else DigitsDataset(x_val, y_val, eval_transform(data))
    return Datasets(train, val, train.classes)


def check_same_classes(train_classes: list[str], val_classes: list[str], root: Path) -> None:
    """Refuse a val/ whose class folders are not train/'s: ImageFolder numbers each split's sorted folders on its own,
    so a class missing from val/ (or one only there) shifts every label after it, and evaluation scores wrong labels.
    """
    if val_classes == train_classes:
        return
    missing, extra = sorted(set(train_classes) - set(val_classes)), sorted(set(val_classes) - set(train_classes))
    raise ValueError(f"{root / 'val'} has other class folders than {root / 'train'} (missing from val/: "
                     f"{', '.join(missing) or 'none'}; only in val/: {', '.join(extra) or 'none'}), and ImageFolder "
                     "would number their labels differently: give val/ the same class folders as train/")


def build_loader(dataset: Dataset, batch_size: int, rank: int, world_size: int, seed: int, train: bool,
                 workers: int, pin_memory: bool) -> DataLoader:
    """Training: DistributedSampler even on one process; the shuffle is a pure function of (seed, epoch), so resume
    is exact. Evaluation: this process's shard of the images, in order (see eval_shard).

    Workers are not persistent: each epoch's start seeds them from the main process's RNG, which a checkpoint saves
    and a resume restores, so the augmentation they draw continues as if never stopped. Persistent workers draw
    their seed once and keep their RNG across epochs, out of any checkpoint's reach (a resume then drew other crops).
    """
    if train:
        sampler = DistributedSampler(dataset, world_size, rank, shuffle=True, seed=seed, drop_last=True)
        return DataLoader(dataset, batch_size, sampler=sampler, num_workers=workers, pin_memory=pin_memory,
                          drop_last=True, persistent_workers=False)
    return DataLoader(eval_shard(dataset, rank, world_size), batch_size, shuffle=False, num_workers=workers,
                      pin_memory=pin_memory, persistent_workers=False)


def eval_shard(dataset: Dataset, rank: int, world_size: int) -> Subset:
    """Every `world_size`-th image from `rank`: each image on exactly one process, so the per-process totals that
    evaluate() sums count it once. DistributedSampler would pad the last shards with repeated images instead (the
    top-1 and image count then included the repeats whenever the images did not divide by the process count)."""
    return Subset(dataset, range(rank, len(dataset), world_size))


def build_mixup(config: TrainConfig, num_classes: int) -> Mixup | None:
    """Mixup 0.8 / CutMix 1.0 with label smoothing folded into the soft targets (Table 5); None when both off."""
    if config.mixup <= 0 and config.cutmix <= 0:
        return None
    return Mixup(mixup_alpha=config.mixup, cutmix_alpha=config.cutmix, label_smoothing=config.label_smoothing,
                 num_classes=num_classes)


def make_criterion(config: TrainConfig, mixup: Mixup | None) -> torch.nn.Module:
    from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

    if mixup is not None:
        return SoftTargetCrossEntropy()
    if config.label_smoothing > 0:
        return LabelSmoothingCrossEntropy(config.label_smoothing)
    return torch.nn.CrossEntropyLoss()
