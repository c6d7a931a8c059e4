"""The per-iteration lr schedule at its edges, and the AdamW parameter groups (weight decay, layer decay)."""
import math

import pytest

from model import create_model
from model.convnext import ConvNeXt
from training.config import resolve
from training.optim import (
    CONVNEXT_MAX_LAYER_ID,
    convnext_layer_id,
    create_optimizer,
    lr_at_step,
    param_groups,
    peak_lr,
    set_lr,
)


def test_warmup_starts_at_zero_and_reaches_peak_at_its_end():
    assert lr_at_step(0, 4e-3, 100, 1000) == 0.0
    assert lr_at_step(50, 4e-3, 100, 1000) == pytest.approx(2e-3)
    assert lr_at_step(100, 4e-3, 100, 1000) == pytest.approx(4e-3)


def test_cosine_is_halfway_at_mid_decay_and_min_lr_at_the_end():
    assert lr_at_step(550, 4e-3, 100, 1000, 1e-6) == pytest.approx(1e-6 + 0.5 * (4e-3 - 1e-6))
    assert lr_at_step(1000, 4e-3, 100, 1000, 1e-6) == pytest.approx(1e-6)
    assert lr_at_step(5000, 4e-3, 100, 1000, 1e-6) == pytest.approx(1e-6)  # clamped past the end
    step = 325  # a quarter through the decay
    assert lr_at_step(step, 1.0, 100, 1000) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.25)))


def test_zero_warmup_starts_at_peak():
    assert lr_at_step(0, 5e-5, 0, 300) == pytest.approx(5e-5)
    assert lr_at_step(150, 5e-5, 0, 300) == pytest.approx(2.5e-5)


@pytest.fixture(scope="module")
def atto():
    return create_model("convnext_atto", num_classes=10)


def test_one_dimensional_params_and_gammas_get_no_weight_decay(atto):
    groups = param_groups(atto, weight_decay=0.05)
    shapes = dict((n, p.ndim) for n, p in atto.named_parameters())
    for group in groups:
        for name in group["names"]:
            expected = 0.0 if shapes[name] <= 1 or name.endswith("gamma") else 0.05
            assert group["weight_decay"] == expected, name
    decayed = {n for g in groups if g["weight_decay"] for n in g["names"]}
    assert "head.weight" in decayed and "stages.0.0.gamma" not in decayed and "head.bias" not in decayed


def test_layer_decay_ids_follow_the_official_optim_factory():
    assert convnext_layer_id("downsample_layers.0.0.weight") == 0  # stem
    assert convnext_layer_id("stages.0.2.dwconv.weight") == 1
    assert convnext_layer_id("downsample_layers.1.1.weight") == 2
    assert convnext_layer_id("stages.1.0.gamma") == 2
    assert convnext_layer_id("stages.2.0.pwconv1.weight") == 3
    assert convnext_layer_id("stages.2.2.pwconv1.weight") == 3
    assert convnext_layer_id("stages.2.3.pwconv1.weight") == 4  # every 3 blocks of stage 3 share an id
    assert convnext_layer_id("stages.2.26.pwconv1.weight") == 11
    assert convnext_layer_id("stages.3.1.gamma") == CONVNEXT_MAX_LAYER_ID
    assert convnext_layer_id("head.weight") == CONVNEXT_MAX_LAYER_ID + 1
    assert convnext_layer_id("norm.weight") == CONVNEXT_MAX_LAYER_ID + 1


@pytest.fixture(scope="module")
def small_layout():
    """ConvNeXt-S/B/L/XL's stage depths 3/3/27/3 at toy widths: the layout the official layer decay is defined for."""
    return ConvNeXt(depths=(3, 3, 27, 3), dims=(8, 16, 32, 64), num_classes=10)


def test_layer_decay_scales_are_decay_to_the_distance_from_the_head(small_layout):
    groups = param_groups(small_layout, weight_decay=0.05, layer_decay=0.8)
    by_name = {n: g for g in groups for n in g["names"]}
    assert by_name["head.weight"]["lr_scale"] == 1.0
    assert by_name["downsample_layers.0.0.weight"]["lr_scale"] == pytest.approx(0.8**13)
    assert by_name["stages.2.5.pwconv1.weight"]["lr_scale"] == pytest.approx(0.8 ** (13 - 4))
    assert {g["layer_id"] for g in groups} == set(range(CONVNEXT_MAX_LAYER_ID + 2))  # 0..13, no jump
    optimizer = create_optimizer(small_layout, 1e-3, 0.05, (0.9, 0.999), 0.8)
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len(list(small_layout.parameters()))


@pytest.mark.parametrize("name", ["convnext_atto", "convnext_tiny"])
def test_layer_decay_on_tiny_and_atto_is_refused_like_the_official_code(name):
    """Their 6/9-block stage 3 gives layer ids {0..5, 12, 13} (a jump); official main.py asserts S/B/L/XL only."""
    with pytest.raises(ValueError, match="--layer-decay 1.0"):
        param_groups(create_model(name, num_classes=2), 0.05, layer_decay=0.8)
    with pytest.raises(ValueError, match="--layer-decay 1.0"):
        resolve("finetune", {"model": name})
    assert resolve("finetune", {"model": name, "layer_decay": 1.0}).layer_decay == 1.0
    assert resolve("finetune", {"model": "convnext_small"}).layer_decay == 0.8


def test_layer_decay_on_resnet_is_refused():
    with pytest.raises(ValueError, match="layer-decay"):
        param_groups(create_model("resnet50", num_classes=2), 0.05, layer_decay=0.7)


def test_the_logged_lr_is_the_schedules_not_the_stems_decayed_one():
    """With layer-wise decay group 0 is the stem at decay^13 of the schedule's rate; logs show the schedule's."""
    optimizer = create_optimizer(create_model("convnext_small", num_classes=2), 5e-5, 0.05, (0.9, 0.999),
                                 layer_decay=0.8)
    set_lr(optimizer, 5e-5)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(5e-5 * 0.8 ** 13)
    assert peak_lr(optimizer) == pytest.approx(5e-5)
