"""The manifest's evaluation transform is the one the weights were evaluated with: a project run's own, torchvision's
for torchvision's ConvNeXt weights, and the official squash (no crop) at 384 px."""
from __future__ import annotations

from dataclasses import asdict

from export.onnx import checkpoint_preprocess
from model import get_config

REGISTRY = asdict(get_config("convnext_tiny").data)
PROJECT = {"input_size": 32, "crop_pct": 1.0, "interpolation": "bilinear", "mean": [0.5] * 3, "std": [0.25] * 3}


def test_official_weights_at_224_get_the_registry_center_crop():
    spec = checkpoint_preprocess(REGISTRY, None, False, "official", "convnext_tiny")
    assert (spec.resize_px, spec.crop_px, spec.crop_mode, spec.interpolation) == (256, 224, "center", "bicubic")


def test_official_weights_at_384_are_warped_without_a_crop_as_the_official_evaluation():
    spec = checkpoint_preprocess(REGISTRY, 384, False, "official", "convnext_base")
    assert (spec.resize_px, spec.crop_px, spec.crop_pct, spec.crop_mode) == (384, 384, 1.0, "squash")


def test_torchvision_convnext_weights_get_torchvisions_own_transform():
    import torchvision.models

    spec = checkpoint_preprocess(REGISTRY, None, False, "torchvision", "convnext_tiny")
    expected = torchvision.models.ConvNeXt_Tiny_Weights.IMAGENET1K_V1.transforms()
    assert (spec.resize_px, spec.crop_px, spec.interpolation) == (236, 224, "bilinear")
    assert (spec.resize_px, spec.crop_px) == (expected.resize_size[0], expected.crop_size[0])
    assert checkpoint_preprocess(REGISTRY, None, False, "torchvision", "convnext_small").resize_px == 230


def test_a_project_checkpoint_keeps_its_own_transform_even_at_384():
    spec = checkpoint_preprocess(PROJECT, None, True, "project", "convnext_atto")
    assert (spec.resize_px, spec.crop_px, spec.interpolation, spec.mean) == (32, 32, "bilinear", (0.5, 0.5, 0.5))
    own_384 = checkpoint_preprocess({**PROJECT, "input_size": 384, "crop_pct": 0.875}, None, True, "project",
                                    "convnext_atto")
    assert (own_384.resize_px, own_384.crop_mode) == (438, "center")
