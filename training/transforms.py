"""Evaluation transform on the training side (torchvision), from a model's DataConfig; the checks and the one repair
the training transform's timm augmentations need.

The service reproduces the evaluation transform without torch (runtime/preprocess.py); a test proves the two agree.
"""
from __future__ import annotations

import re

from PIL import Image, ImageOps
from torchvision import transforms as T

from model.registry import DataConfig

INTERPOLATION = {
    "bicubic": T.InterpolationMode.BICUBIC,
    "bilinear": T.InterpolationMode.BILINEAR,
    "nearest": T.InterpolationMode.NEAREST,
}


def eval_transform(data: DataConfig) -> T.Compose:
    """Resize to int(input_size / crop_pct), center-crop input_size, to tensor, normalize.

    crop_mode "center" resizes the short side (timm's default); "squash" resizes both sides, aspect not kept (timm's
    squash; at crop_pct 1.0 the official datasets.py evaluation at >= 384: `Resize((size, size))`, no crop).
    """
    if data.crop_mode not in ("center", "squash"):
        raise ValueError(f"crop_mode must be center or squash, got {data.crop_mode!r}")
    size = data.resize_px if data.crop_mode == "center" else (data.resize_px, data.resize_px)
    return T.Compose(
        [
            T.Resize(size, interpolation=INTERPOLATION[data.interpolation]),
            T.CenterCrop(data.input_size),
            T.ToTensor(),
            T.Normalize(data.mean, data.std),
        ]
    )


RAND_TRANSFORM_SETS = ("weights", "3aw", "3a")  # timm's rand_augment_choices
AUTO_AUGMENT_EXAMPLE = ("rand-m9-mstd0.5-inc1 (RandAugment, the paper's), augmix-m5-w3, "
                        "original-mstd0.5 (AutoAugment), or '' for none")


def check_auto_augment(spec: str) -> None:
    """Raise ValueError unless timm reads every section of this --auto-augment spec ("" = none).

    timm's own parse fails on an unknown policy or section with a bare assertion, when the first batch is being set
    up, and skips a section with no number in it ('rand-mX') without a word; this says which, before any work."""
    if not spec:
        return
    from timm.data import create_transform

    family, *sections = spec.split("-")
    transform_sets = 0
    for section in sections:
        if family == "rand" and section.startswith("t"):
            transform_sets += 1
            if transform_sets > 1 or section[1:] not in RAND_TRANSFORM_SETS:
                raise ValueError(f"--auto-augment {spec!r}: a RandAugment transform set is one section t<name>, name "
                                 f"one of {', '.join(RAND_TRANSFORM_SETS)} (timm takes any other as its default set, "
                                 "and the first of several)")
        elif not re.search(r"\d", section):
            raise ValueError(f"--auto-augment {spec!r}: section {section!r} has no value (timm would ignore it); "
                             f"e.g. {AUTO_AUGMENT_EXAMPLE}")
    try:
        create_transform(32, is_training=True, auto_augment=spec)
    except (AssertionError, ValueError, KeyError) as error:
        reason = str(error) or "not a policy or section timm knows"
        raise ValueError(f"--auto-augment {spec!r}: {reason}; e.g. {AUTO_AUGMENT_EXAMPLE}") from None



def posterize_keeping_zero_bits(img: Image.Image, bits_to_keep: int, **_) -> Image.Image:
    """timm's Posterize op, with Pillow < 13's answer to 0 bits kept: a black image (every bit masked off).

    timm's RandAugment and AutoAugment ask for 0 bits whenever an increasing posterize's magnitude is sampled at its
    top (the paper's rand-m9-mstd0.5-inc1: ~1 image in 600) or a plain one's near 0; Pillow 13 refuses that ("bits
    must be between or equal to 1 and 8") and a run ended mid-epoch. The official runs' Pillow made the black image."""
    if bits_to_keep >= 8:
        return img
    if bits_to_keep <= 0 and img.mode in ("RGB", "L"):  # the modes Pillow < 13 posterized; others it refused
        return Image.new(img.mode, img.size)
    return ImageOps.posterize(img, bits_to_keep)


def augment_ops(transform) -> list:
    """The AugmentOps of a timm training transform's RandAugment / AugMix (`ops`) and AutoAugment (`policy`)."""
    return [op for step in getattr(transform, "transforms", ()) for op in
            [*getattr(step, "ops", ()), *(op for sub_policy in getattr(step, "policy", ()) for op in sub_policy)]]


def with_zero_bit_posterize(transform):
    """The timm training transform with every Posterize op of its RandAugment / AutoAugment / AugMix made
    posterize_keeping_zero_bits; the ops' random draws are the same."""
    from timm.data import auto_augment

    for op in augment_ops(transform):
        if getattr(op, "aug_fn", None) is auto_augment.posterize:
            op.aug_fn = posterize_keeping_zero_bits
    return transform
