"""Evaluation transform on the training side (torchvision), from a model's DataConfig.

The service reproduces it without torch (service/preprocess.py); a test proves the two agree.
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
    """Resize the short side to int(input_size / crop_pct), center-crop input_size, to tensor, normalize."""
    return T.Compose(
        [
            T.Resize(data.resize_px, interpolation=INTERPOLATION[data.interpolation]),
            T.CenterCrop(data.input_size),
            T.ToTensor(),
            T.Normalize(data.mean, data.std),
        ]
    )
