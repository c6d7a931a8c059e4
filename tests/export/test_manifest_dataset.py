"""The manifest records what the weights were trained on (source.dataset), from the checkpoint or --dataset."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from export.onnx import export_onnx_version
from export.source import dataset_of, pretrained_of
from runtime.repository import MANIFEST_FILE, ModelRepository
from service.model_card import describe

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(("raw", "checkpoint", "source_format", "num_classes", "expected"), [
    ({"config": {"data_dir": ""}}, "runs/demo/checkpoint_best.pth", "project", 10, "digits"),
    ({"config": {"data_dir": "/data/flowers/"}}, "runs/f/checkpoint_best.pth", "project", 5, "flowers"),
    ({}, "cache/convnext_tiny_1k_224_ema.pth", "official", 1000, "ImageNet-1K"),
    ({}, "convnext_base_22k_224.pth", "official", 21841, "ImageNet-22K"),
    ({}, "convnext_tiny_22k_1k_384.pth", "official", 1000, "ImageNet-22K, fine-tuned on ImageNet-1K"),
    ({}, "timm_convnext.pth", "timm", 1000, "ImageNet-1K"),
    ({}, "my_head.pth", "official", 10, None),
    ({}, None, "random", 1000, None),
])
def test_dataset_of_a_checkpoint(raw, checkpoint, source_format, num_classes, expected):
    assert dataset_of(raw, checkpoint, source_format, num_classes) == expected


@pytest.mark.parametrize(("checkpoint", "source_format", "model_name", "num_classes", "expected"), [
    ("cache/convnext_tiny_1k_224_ema.pth", "official", "convnext_tiny", 1000, "convnext_tiny_1k_224_ema"),
    ("convnext_base_22k_224.pth", "official", "convnext_base", 21841, "convnext_base_22k_224"),
    # the official repository's own fine-tuning: its key names, on the user's classes
    ("runs/flowers/checkpoint-best.pth", "official", "convnext_tiny", 5, None),
    ("convnext_tiny_1k_224_ema.pth", "official", "convnext_tiny", 5, None),  # another head than the file's
    ("hub/checkpoints/convnext_tiny-983f1562.pth", "torchvision", "convnext_tiny", 1000,
     "ConvNeXt_Tiny_Weights.IMAGENET1K_V1"),
    ("resnet50-0676ba61.pth", "torchvision", "resnet50", 1000, "ResNet50_Weights.IMAGENET1K_V1"),
    ("my_resnet.pth", "torchvision", "resnet50", 1000, None),
    ("runs/demo/checkpoint_best.pth", "project", "convnext_atto", 10, None),
    (None, "random", "convnext_atto", 1000, None),
])
def test_pretrained_weights_are_known_by_name_never_by_format(checkpoint, source_format, model_name, num_classes,
                                                             expected):
    assert pretrained_of(checkpoint, source_format, model_name, num_classes) == expected


@pytest.fixture(scope="module")
def demo_checkpoint(tmp_path_factory):
    """A real (tiny) demo run: `python -m training --preset demo` without --data-dir, i.e. the digits."""
    output = tmp_path_factory.mktemp("demo") / "run"
    subprocess.run([sys.executable, "-m", "training", "--preset", "demo", "--epochs", "1", "--max-steps-per-epoch", "2",
                    "--batch-size", "16", "--output", str(output)], check=True, timeout=600,
                   env=os.environ | {"PYTHONPATH": str(ROOT)}, stdout=subprocess.DEVNULL)
    return output / "checkpoint_best.pth"


@pytest.fixture(scope="module")
def demo_version(demo_checkpoint):
    return export_onnx_version(demo_checkpoint.parent / "models", "digits", checkpoint=demo_checkpoint)


def test_a_demo_run_checkpoint_exports_as_digits_and_dataset_overrides(demo_version, demo_checkpoint, tmp_path):
    assert demo_version.manifest.source.dataset == "digits" and demo_version.manifest.source.format == "project"
    named = export_onnx_version(tmp_path, "digits", checkpoint=demo_checkpoint, dataset="MNIST-like scans")
    assert named.manifest.source.dataset == "MNIST-like scans"


def test_a_manifest_written_before_the_dataset_field_still_loads(demo_version, tmp_path):
    """schema_version 1 stays readable: `source.dataset` is optional (the service then infers it)."""
    version = demo_version
    old = json.loads((version.path / MANIFEST_FILE).read_text())
    del old["source"]["dataset"]
    folder = tmp_path / "digits" / "1"
    folder.mkdir(parents=True)
    for artifact in version.manifest.artifacts:
        (folder / artifact.file).write_bytes((version.path / artifact.file).read_bytes())
    (folder / MANIFEST_FILE).write_text(json.dumps(old))
    manifest = ModelRepository(tmp_path).load("digits").manifest
    assert manifest.source.dataset is None
    assert describe(manifest)["source"] == "demo" and describe(manifest)["dataset"] == "digits"
