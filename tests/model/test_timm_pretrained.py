"""timm's pretrained tags of the ConvNeXts built here: every one is in the table, with timm's own pretrained_cfg
(the installed timm's, read here), its weights load into our model, and a checkpoint's path names its tag."""
from __future__ import annotations

import pytest
import timm
import torch
from timm.models import convnext as timm_convnext

from model import create_model, list_models
from model.checkpoints import load_checkpoint
from model.timm_pretrained import TIMM_PRETRAINED, find_timm_pretrained, get_timm_pretrained


def timm_cfgs() -> dict:
    """timm's pretrained_cfg of every tag of a model built here; tags without a head (num_classes 0: DINOv3, EUPE
    feature extractors) cannot be served as classifiers."""
    ours = set(list_models())
    return {f"{model}.{tag}": cfg for model, cfgs in timm_convnext.default_cfgs.items() if model in ours
            for tag, cfg in cfgs.cfgs.items() if cfg.num_classes}


def test_the_table_holds_every_timm_tag_of_these_models():
    assert sorted(TIMM_PRETRAINED) == sorted(timm_cfgs())


@pytest.mark.parametrize("name", sorted(TIMM_PRETRAINED))
def test_each_tag_has_timms_evaluation_fields(name):
    ours, cfg = TIMM_PRETRAINED[name], timm_cfgs()[name]
    test_size = cfg.test_input_size[-1] if cfg.test_input_size else None
    assert (ours.input_size_px, ours.crop_pct, ours.crop_mode, ours.num_classes, test_size, ours.test_crop_pct) == (
        cfg.input_size[-1], cfg.crop_pct, cfg.crop_mode, cfg.num_classes, test_size, cfg.test_crop_pct)
    assert (ours.mean, ours.std, "bicubic") == (tuple(cfg.mean), tuple(cfg.std), cfg.interpolation)


def test_the_in12k_tags_at_224_evaluate_at_crop_pct_095_not_0875():
    for model in ("convnext_tiny", "convnext_small", "convnext_nano"):
        for tag in ("in12k", "in12k_ft_in1k"):
            assert get_timm_pretrained(f"{model}.{tag}").data_config()["crop_pct"] == 0.95
    assert get_timm_pretrained("convnext_tiny.fb_in22k").crop_pct == 0.875  # the official weights keep 0.875


@pytest.mark.parametrize("model_name, num_classes", sorted({(t.model_name, t.num_classes)
                                                            for t in TIMM_PRETRAINED.values()}))
def test_each_tags_weights_load_into_our_model(model_name, num_classes):
    with torch.device("meta"):  # names and shapes only: no memory for ConvNeXt-XL's weights
        reference = timm.create_model(model_name, pretrained=False, num_classes=num_classes)
        ours = create_model(model_name, num_classes=num_classes)
    result = load_checkpoint(ours, reference.state_dict())
    assert (result.source_format, result.head_reinitialised) == ("timm", False)


def test_the_test_size_takes_the_test_crop():
    tag = get_timm_pretrained("convnext_tiny.in12k_ft_in1k")
    assert (tag.data_config()["input_size"], tag.data_config()["crop_pct"]) == (224, 0.95)
    assert tag.data_config(288)["crop_pct"] == 1.0 and tag.data_config(256)["crop_pct"] == 0.95


@pytest.mark.parametrize("path, expected", [
    ("/hf/hub/models--timm--convnext_tiny.in12k_ft_in1k/snapshots/4d1f/pytorch_model.bin",
     "convnext_tiny.in12k_ft_in1k"),
    ("weights/convnext_nano.in12k.pth", "convnext_nano.in12k"),
    ("convnext_base.clip_laion2b_augreg_ft_in1k/pytorch_model.bin", "convnext_base.clip_laion2b_augreg_ft_in1k"),
    ("cache/convnext_tiny_22k_224.pth", None),  # an official file name: the official table says what it is
    ("runs/convnext_tiny.in12k_ft_in1k_but_mine/checkpoint_best.pth", None),
])
def test_a_checkpoint_path_names_its_timm_tag(path, expected):
    found = find_timm_pretrained(path)
    assert (found.name if found else None) == expected


def test_an_unknown_tag_is_refused_with_the_models_tags():
    with pytest.raises(ValueError, match="convnext_large.fb_in22k_ft_in1k"):
        get_timm_pretrained("convnext_large.in12k_ft_in1k")
