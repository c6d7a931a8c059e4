"""Evaluation transform on the training side (torchvision), from a model's DataConfig.

The service reproduces it without torch (runtime/preprocess.py); a test proves the two agree.
"""
from __future__ import annotations

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
