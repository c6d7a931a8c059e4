"""Checkpoints written by other training code load with weights_only=True: the official ConvNeXt utils.save_model's
and timm's CheckpointSaver's (both pickle their argparse flags as 'args'), their EMA weights on request (official
--model_key model_ema, export --ema); a checkpoint carrying code is still refused, unexecuted."""
from __future__ import annotations

import argparse
import builtins
import os
import subprocess

import pytest
import timm
import torch
from timm.utils import CheckpointSaver, ModelEma, ModelEmaV3, get_state_dict

from model import create_model, draw_layer_scales
from model.checkpoints import CheckpointError, load_checkpoint, read_checkpoint


def _perturb(module: torch.nn.Module) -> None:
    """Move the trained weights away from the EMA copy taken before, so loading the wrong one shows."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.1)


def _logits(module: torch.nn.Module) -> torch.Tensor:
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        return module.eval()(images)


def _official_save_model(path, model, model_ema, args) -> None:
    """What facebookresearch/ConvNeXt's utils.save_model writes (its main.py keeps EMA weights in timm's ModelEma)."""
    torch.save({"model": model.state_dict(), "optimizer": torch.optim.AdamW(model.parameters()).state_dict(),
                "epoch": 299, "scaler": torch.amp.GradScaler("cpu").state_dict(), "args": args,
                "model_ema": get_state_dict(model_ema)}, path)


def test_an_official_training_checkpoint_loads_its_model_or_its_ema_weights(tmp_path):
    torch.manual_seed(0)
    trained = create_model("convnext_atto")
    draw_layer_scales(trained)  # in the EMA copy too: at 1e-6 its blocks would not shape the logits compared
    ema = ModelEma(trained, decay=0.9999)
    _perturb(trained)
    args = argparse.Namespace(model="convnext_atto", lr=4e-3, model_ema=True, model_ema_decay=0.9999,
                              input_size=224, output_dir=str(tmp_path), layer_decay=1.0, head_init_scale=1.0)
    path = tmp_path / "checkpoint-best.pth"
    _official_save_model(path, trained, ema, args)
    assert read_checkpoint(path)["args"] == args
    for use_ema, source in ((False, trained), (True, ema.ema)):
        model = create_model("convnext_atto")
        assert load_checkpoint(model, path, use_ema=use_ema).source_format == "native"
        torch.testing.assert_close(_logits(model), _logits(source), rtol=0, atol=0)
    assert not torch.equal(_logits(trained), _logits(ema.ema))  # the two loads above were told apart


def test_a_timm_training_checkpoint_loads_its_model_or_its_state_dict_ema(tmp_path):
    torch.manual_seed(0)
    trained = timm.create_model("convnext_atto", pretrained=False)
    draw_layer_scales(trained)  # timm's `gamma`: near 1, as training leaves them, so the blocks shape the logits
    ema = ModelEmaV3(trained, decay=0.9998)
    _perturb(trained)
    args = argparse.Namespace(model="convnext_atto", lr=None, model_ema=True, model_kwargs={}, input_size=None)
    saver = CheckpointSaver(trained, torch.optim.AdamW(trained.parameters()), args=args, model_ema=ema,
                            checkpoint_dir=str(tmp_path), recovery_dir=str(tmp_path))
    saver.save_checkpoint(epoch=0, metric=71.5)  # 'state_dict', 'state_dict_ema', 'args', 'arch', 'metric', 'saver'
    path = tmp_path / "last.pth.tar"
    assert read_checkpoint(path)["metric"] == 71.5
    for use_ema, source in ((False, trained), (True, ema.module)):
        model = create_model("convnext_atto")
        assert load_checkpoint(model, path, use_ema=use_ema).source_format == "timm"
        torch.testing.assert_close(_logits(model), _logits(source), rtol=1e-5, atol=1e-5)


class _OpensAFileWhenUnpickled:
    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return builtins.open, (self.path, "w")


@pytest.mark.parametrize("what", ["a function", "a class", "code run when unpickled", "a function inside args"])
def test_a_checkpoint_carrying_code_is_still_refused_unexecuted(tmp_path, what):
    marker = tmp_path / "written by the checkpoint"
    payload = {
        "a function": os.system,
        "a class": subprocess.Popen,
        "code run when unpickled": _OpensAFileWhenUnpickled(marker),
        "a function inside args": argparse.Namespace(model="convnext_atto", callback=os.system),
    }[what]
    path = tmp_path / "checkpoint.pth"
    torch.save({"model": {"head.bias": torch.zeros(2)}, "args": payload}, path)
    with pytest.raises(CheckpointError, match="holds objects other than tensors and plain data"):
        read_checkpoint(path)
    assert not marker.exists()
