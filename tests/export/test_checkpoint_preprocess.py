"""The manifest's evaluation transform is the one the weights were evaluated with: a project run's own, torchvision's
for torchvision's ConvNeXt weights, timm's pretrained_cfg for timm's weights (by their tag), and the official squash
(no crop) at 384 px."""
from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

from export.__main__ import main
from export.labels import imagenet22k_labels
from export.source import ExportError, checkpoint_preprocess, load_source, official_pretrained_of
from model import create_model, get_config
from model.pretrained import PRETRAINED_CHECKPOINTS
from model.timm_pretrained import TIMM_PRETRAINED
from runtime.repository import MANIFEST_FILE

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


def timm_transform(name: str, use_test_size: bool = False) -> tuple:
    """timm's own evaluation transform of a tag, from its pretrained_cfg: (crop mode, resize px, crop px,
    interpolation, mean, std)."""
    import timm.data

    cfg = timm.models.get_pretrained_cfg(name).to_dict()
    resize, crop, *_, normalize = timm.data.create_transform(
        **timm.data.resolve_data_config({}, pretrained_cfg=cfg, use_test_size=use_test_size)).transforms
    squash = isinstance(resize.size, (tuple, list))  # Resize((h, w)) warps, Resize(short side) keeps the aspect
    return ("squash" if squash else "center", resize.size[0] if squash else resize.size, crop.size[0],
            resize.interpolation.value, *normalize.mean.tolist(), *normalize.std.tolist())


def manifest_transform(spec) -> tuple:
    return (spec.crop_mode, spec.resize_px, spec.crop_px, spec.interpolation, *spec.mean, *spec.std)


@pytest.mark.parametrize("name", sorted(TIMM_PRETRAINED))
def test_timm_weights_get_the_transform_timm_evaluates_them_with(name):
    tag = TIMM_PRETRAINED[name]
    spec = checkpoint_preprocess(tag.data_config(), None, True, "timm", tag.model_name)
    assert manifest_transform(spec) == pytest.approx(timm_transform(name), abs=1e-7)  # timm's mean: float32
    if tag.test_input_size_px is not None:  # timm's top-1 at its test size, with its test crop
        at_test_size = checkpoint_preprocess(tag.data_config(tag.test_input_size_px), None, True, "timm",
                                             tag.model_name)
        assert manifest_transform(at_test_size) == pytest.approx(timm_transform(name, use_test_size=True), abs=1e-7)


def save_timm_checkpoint(path: Path, model_name: str, num_classes: int) -> Path:
    """A real timm-format checkpoint: timm's own module's state dict (random weights), as torch.save writes it."""
    import timm

    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(timm.create_model(model_name, pretrained=False, num_classes=num_classes).state_dict(), path)
    return path


def test_a_timm_checkpoint_in_the_hugging_face_cache_is_known_by_its_path(tmp_path):
    """convnext_nano.in12k: 11821 classes, crop_pct 0.95 (not the registry's 0.875), without any flag."""
    path = save_timm_checkpoint(
        tmp_path / "hub" / "models--timm--convnext_nano.in12k" / "snapshots" / "0a1b" / "pytorch_model.bin",
        "convnext_nano", 11821)
    source = load_source(None, path)
    assert (source.model_name, source.num_classes, source.source.format) == ("convnext_nano", 11821, "timm")
    assert (source.preprocess.crop_pct, source.preprocess.resize_px, source.preprocess.crop_px) == (0.95, 235, 224)
    assert source.source.dataset == "ImageNet-12K" and source.source.pretrained == "convnext_nano.in12k"


def test_a_renamed_timm_checkpoint_is_named_with_timm_name_and_an_unnamed_one_warns(tmp_path, caplog):
    path = save_timm_checkpoint(tmp_path / "weights.pth", "convnext_nano", 1000)
    named = load_source(None, path, timm_name="convnext_nano.in12k_ft_in1k")
    assert (named.preprocess.crop_pct, named.preprocess.resize_px) == (0.95, 235)
    assert named.source.dataset == "ImageNet-12K, fine-tuned on ImageNet-1K"
    assert named.source.pretrained == "convnext_nano.in12k_ft_in1k"
    with pytest.raises(ExportError, match="the checkpoint holds convnext_nano; drop --model"):
        load_source("convnext_tiny", path, timm_name="convnext_nano.in12k_ft_in1k")
    with caplog.at_level("WARNING", logger="export.source"):
        unnamed = load_source("convnext_nano", path)
    assert unnamed.preprocess.crop_pct == 0.875 and unnamed.source.pretrained is None  # timm's names, origin unknown
    assert "--timm-name" in caplog.text and "convnext_nano.in12k_ft_in1k 0.95" in caplog.text


def test_an_official_file_is_known_by_its_name_with_its_class_count_and_input_size(tmp_path):
    """convnext_tiny_22k_224.pth (21841 classes) exports without --model or --num-classes, as `convnext serve
    --pretrained` and the compose `prepare` export it; a 384 px one gets the official squash at 384."""
    path = tmp_path / "convnext_tiny_22k_224.pth"
    torch.manual_seed(0)
    torch.save({"model": create_model("convnext_tiny", num_classes=21841).state_dict()}, path)
    source = load_source(None, path)
    assert (source.model_name, source.num_classes, source.source.format) == ("convnext_tiny", 21841, "official")
    assert source.labels == imagenet22k_labels() and source.source.dataset == "ImageNet-22K"
    assert source.source.pretrained == "convnext_tiny_22k_224"
    assert (source.preprocess.resize_px, source.preprocess.crop_px) == (256, 224)
    at_384 = tmp_path / "convnext_tiny_22k_1k_384.pth"
    torch.save({"model": create_model("convnext_tiny").state_dict()}, at_384)
    squashed = load_source(None, at_384)
    assert (squashed.num_classes, squashed.source.dataset) == (1000, "ImageNet-22K, fine-tuned on ImageNet-1K")
    assert squashed.source.pretrained == "convnext_tiny_22k_1k_384"
    assert (squashed.preprocess.crop_px, squashed.preprocess.crop_mode) == (384, "squash")
    for name, official in PRETRAINED_CHECKPOINTS.items():
        assert official_pretrained_of(tmp_path / f"{name}.pth", None) == official
    # --model naming another architecture: the flags, not the file name, say what the file holds.
    assert official_pretrained_of(path, "convnext_atto") is None
    assert official_pretrained_of(tmp_path / "my_weights.pth", None) is None


def test_the_cli_writes_a_timm_tags_transform_into_the_manifest(tmp_path, photo_folder, capsys):
    path = save_timm_checkpoint(tmp_path / "weights.pth", "convnext_nano", 1000)
    code = main(["onnx", "--checkpoint", str(path), "--timm-name", "convnext_nano.d1h_in1k", "--name", "nano",
                 "--repository", str(tmp_path / "models"), "--input-size", "64", "--verify-images", str(photo_folder),
                 "--quiet"])
    assert code == 0, capsys.readouterr().err
    manifest = json.loads((tmp_path / "models" / "nano" / "1" / MANIFEST_FILE).read_text())
    assert manifest["architecture"] == "convnext_nano" and manifest["source"]["format"] == "timm"
    assert manifest["source"]["pretrained"] == "convnext_nano.d1h_in1k"
    assert {k: manifest["preprocess"][k] for k in ("crop_pct", "resize_px", "crop_px", "crop_mode")} == {
        "crop_pct": 0.95, "resize_px": 67, "crop_px": 64, "crop_mode": "center"}
