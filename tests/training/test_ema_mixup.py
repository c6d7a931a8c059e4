"""EMA update math and evaluation, and the Mixup/CutMix soft targets (sum to one, label smoothing folded in)."""
import dataclasses

import torch
from torch import nn

from training.config import PRESETS
from training.data import build_mixup, make_criterion
from training.distributed import DistInfo
from training.ema import ModelEma
from training.run import build_run, evaluate_epoch, wrap_model


def test_ema_update_is_decay_times_ema_plus_one_minus_decay_times_model():
    model = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))
    ema = ModelEma(model, decay=0.9)
    before = {k: v.clone() for k, v in ema.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    model[1].num_batches_tracked.fill_(7)
    ema.update(model)
    for key, value in model.state_dict().items():
        if value.dtype.is_floating_point:
            torch.testing.assert_close(ema.state_dict()[key], 0.9 * before[key] + 0.1 * value)
        else:
            assert torch.equal(ema.state_dict()[key], value)
    assert all(not p.requires_grad for p in ema.module.parameters())


def test_with_channels_last_the_ema_is_evaluated_on_channels_last_inputs_as_the_model_is(tmp_path):
    """The EMA copy holds channels_last weights too; NCHW inputs would make every convolution convert them."""
    config = dataclasses.replace(PRESETS["demo"], channels_last=True, ema_decay=0.9, output=str(tmp_path), quiet=True)
    run = build_run(config, DistInfo(), augment=False)
    wrap_model(run)
    ema_conv = run.state.ema.module.downsample_layers[0][0].weight
    assert ema_conv.is_contiguous(memory_format=torch.channels_last)
    seen: dict[str, set[bool]] = {"model": set(), "ema": set()}
    for name, module in (("model", run.state.unwrapped), ("ema", run.state.ema.module)):
        module.register_forward_pre_hook(
            lambda _, inputs, name=name: seen[name].add(inputs[0].is_contiguous(memory_format=torch.channels_last)))
    record = {"epoch": 0}
    evaluate_epoch(run, record)
    assert seen == {"model": {True}, "ema": {True}}
    assert record["val_count"] == record["ema_val_count"] == 360


def test_mixup_cutmix_targets_sum_to_one_with_smoothing():
    torch.manual_seed(0)
    mixup = build_mixup(PRESETS["in1k"], num_classes=10)
    images, labels = torch.randn(8, 3, 16, 16), torch.arange(8)
    mixed, targets = mixup(images, labels)
    assert mixed.shape == images.shape and targets.shape == (8, 10)
    torch.testing.assert_close(targets.sum(1), torch.ones(8))
    assert targets.min() >= 0.1 / 10 * 0.99  # smoothing 0.1 spreads 0.01 to every class
    assert type(make_criterion(PRESETS["in1k"], mixup)).__name__ == "SoftTargetCrossEntropy"


def test_no_mixup_presets_use_label_smoothing_cross_entropy():
    config = PRESETS["finetune"]
    assert build_mixup(config, 10) is None
    assert type(make_criterion(config, None)).__name__ == "LabelSmoothingCrossEntropy"
