"""Randomly initialised BatchNorm networks get running statistics, so their logits survive float16."""
from __future__ import annotations

import torch

from export.source import load_source
from model import create_model
from model.batchnorm_calibration import calibrate_batch_norms


def test_the_gelu_roadmap_step_keeps_logits_float16_can_hold_once_calibrated():
    torch.manual_seed(0)
    module = create_model("roadmap_r50_gelu").eval()
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        before = module(x)
    assert before.abs().max() < 1e-6 and not before.half().any()  # what an fp16 engine would answer: zeros
    weights = {k: v.clone() for k, v in module.state_dict().items() if "running" not in k and "num_batches" not in k}
    assert calibrate_batch_norms(module, 32) == 57
    with torch.no_grad():
        after = module(x)
    assert not module.training and 0.1 < after.abs().max() < 100
    assert torch.allclose(after.half().float(), after, rtol=1e-2, atol=1e-3)
    assert all(torch.equal(v, module.state_dict()[k]) for k, v in weights.items())  # no weight touched
    assert all(m.momentum == 0.1 for m in module.modules() if isinstance(m, torch.nn.BatchNorm2d))


def test_a_network_without_batchnorm_is_left_alone():
    torch.manual_seed(0)
    module = create_model("convnext_atto").train()
    state = {k: v.clone() for k, v in module.state_dict().items()}
    assert calibrate_batch_norms(module, 32) == 0
    assert module.training and all(torch.equal(v, module.state_dict()[k]) for k, v in state.items())


def test_an_export_of_random_weights_calibrates_its_batchnorms_and_a_checkpoint_keeps_its_own(tmp_path):
    torch.manual_seed(0)
    random_init = load_source("roadmap_r50_gelu", None, input_size=32)
    with torch.no_grad():
        logits = random_init.module(torch.randn(2, 3, 32, 32))
    assert 0.1 < logits.abs().max() < 100 and logits.half().any()  # an fp16 engine has something to agree with
    module = create_model("roadmap_r50_gelu")
    torch.save({"model": module.state_dict()}, tmp_path / "weights.pth")  # the statistics of init: kept as they are
    loaded = load_source("roadmap_r50_gelu", tmp_path / "weights.pth", input_size=32)
    assert all(torch.equal(v, loaded.module.state_dict()[k]) for k, v in module.state_dict().items())
