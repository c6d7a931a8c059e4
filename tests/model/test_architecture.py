"""Options of the ConvNeXt family (activation, stochastic depth, layer scale, head init) and of the ResNet-50
baseline; ONNX-clean export."""
from __future__ import annotations

from collections import Counter

import pytest
import torch
from torch import nn

from model import create_model
from model.convnext import Block, DropPath, LayerNorm2d
from model.roadmap import Design


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))


def test_relu_model_has_no_gelu_and_computes_something_else(images):
    torch.manual_seed(0)
    gelu = create_model("convnext_atto", layer_scale_init=1.0).eval()
    relu = create_model("convnext_atto", layer_scale_init=1.0, activation="relu").eval()
    relu.load_state_dict(gelu.state_dict())  # same weights: only the activation differs
    assert not any(isinstance(m, nn.GELU) for m in relu.modules())
    assert sum(isinstance(m, nn.ReLU) for m in relu.modules()) == 12
    with torch.no_grad():
        assert not torch.allclose(gelu(images), relu(images), atol=1e-3)


def test_unknown_activation_is_rejected():
    with pytest.raises(ValueError, match="unknown activation 'swish'; choose one of: gelu, relu"):
        create_model("convnext_atto", activation="swish")


def test_stochastic_depth_grows_linearly_from_zero_to_the_rate():
    model = create_model("convnext_atto", drop_path_rate=0.3)
    rates = [block.drop_path.drop_prob for block in model.modules() if isinstance(block, Block)]
    assert len(rates) == 12
    assert rates == pytest.approx([0.3 * i / 11 for i in range(12)])


def test_layer_scale_init_value_and_off():
    model = create_model("convnext_atto", layer_scale_init=0.25)
    gammas = [block.gamma for block in model.modules() if isinstance(block, Block)]
    assert all(torch.all(g == 0.25) for g in gammas)
    assert all(b.gamma is None for b in create_model("convnext_isotropic_small").modules() if isinstance(b, Block))


def test_head_init_scale_scales_the_classifier():
    torch.manual_seed(0)
    full = float(create_model("convnext_atto").head.weight.detach().std())
    torch.manual_seed(0)
    scaled = float(create_model("convnext_atto", head_init_scale=0.001).head.weight.detach().std())
    assert scaled == pytest.approx(full * 0.001, rel=1e-4)


@pytest.mark.parametrize("name", ["convnext_atto", "convnext_isotropic_small", "roadmap_r50_kernel7"])
@pytest.mark.parametrize(("option", "value"), [
    ("layer_scale_init", -1e-6), ("layer_scale_init", float("nan")), ("layer_scale_init", float("inf")),
    ("head_init_scale", 0.0), ("head_init_scale", -1.0), ("head_init_scale", float("nan")),
    ("head_init_scale", float("inf"))])
def test_a_layer_scale_or_head_scale_that_would_silently_change_the_model_is_refused(name, option, value):
    """-1e-6 and NaN once read as "no layer scale" (blocks keep it when `> 0`); a NaN head scale made a NaN head."""
    with pytest.raises(ValueError, match=f"{option} must be a finite number .*, got [^;]*$"):  # no roadmap step advice
        create_model(name, **{option: value})


def test_roadmap_design_refuses_a_negative_layer_scale():
    with pytest.raises(ValueError, match="layer_scale_init must be a finite number >= 0"):
        Design(layer_scale_init=-1e-6)


def test_drop_path_of_one_drops_every_branch_and_more_than_one_is_refused():
    dropped = DropPath(1.0).train()(torch.ones(4, 3, 2, 2))
    assert torch.equal(dropped, torch.zeros(4, 3, 2, 2))  # not NaN (a division by keep_prob 0)
    with pytest.raises(ValueError, match=r"drop_path_rate 1.5 is not a probability: pass a value in \[0, 1\]"):
        create_model("convnext_atto", drop_path_rate=1.5)
    with pytest.raises(ValueError, match=r"drop_prob -0.1 is not a probability"):
        DropPath(-0.1)


def test_resnet50_takes_in_chans(images):
    model = create_model("resnet50", in_chans=1, num_classes=10).eval()
    assert model.conv1.in_channels == 1
    with torch.no_grad():
        assert model(images[:, :1]).shape == (2, 10)


@pytest.mark.parametrize(("option", "value"), [("layer_scale_init", 1e-6), ("head_init_scale", 0.001)])
def test_resnet50_refuses_convnext_options_it_does_not_have(option, value):
    with pytest.raises(ValueError, match=f"ResNet baseline .* {option}={value}"):
        create_model("resnet50", **{option: value})
    assert create_model("resnet50", layer_scale_init=0.0, head_init_scale=1.0) is not None  # the defaults: none


def test_onnx_export_has_one_layer_norm_op_per_norm_and_few_transposes(tmp_path):
    model = create_model("convnext_atto").eval()
    program = torch.onnx.export(model, (torch.randn(1, 3, 64, 64),), opset_version=18, dynamo=True, verbose=False)
    ops = Counter(node.op_type for node in program.model_proto.graph.node)
    blocks = sum(isinstance(m, Block) for m in model.modules())
    norms = sum(isinstance(m, nn.LayerNorm) for m in model.modules())
    norms_2d = sum(isinstance(m, LayerNorm2d) for m in model.modules())
    assert ops["LayerNormalization"] == norms == 17
    assert ops["Pow"] == 0 and ops["Sqrt"] == 0
    assert ops["ReduceMean"] == 1  # the global average pool only, no decomposed norm
    assert ops["Transpose"] <= 2 * blocks + 2 * norms_2d
