"""The modernization roadmap: every row of Tables 10 and 11 is a model of one configurable network, its GMACs match
the paper (or say exactly why not), it starts at torchvision's ResNet and ends exactly at ConvNeXt-T / ConvNeXt-B."""
from __future__ import annotations

import json
import re
from dataclasses import fields, replace

import pytest
import torch
from torch import nn
from torchvision.models.resnet import Bottleneck, ResNet

import model
from model.__main__ import format_roadmap, main, roadmap_rows
from model.roadmap import Design, RoadmapNet
from model.roadmap_steps import REGIMES, ROADMAP_MODELS, STEPS

TABLE_10_LABELS = [
    "ResNet-50 (PyTorch)", "ResNet-50 (enhanced recipe)", "stage ratio", '"patchify" stem', "depthwise conv",
    "increase width", "inverting dimensions", "move up depthwise conv", "kernel size -> 5", "kernel size -> 7",
    "kernel size -> 9", "kernel size -> 11", "ReLU -> GELU", "fewer activations", "fewer norms", "BN -> LN",
    "separate d.s. conv (ConvNeXt-T)",
]
STEP_PARAMS = [pytest.param(s, id=f"{s.regime}-{s.key}") for steps in STEPS.values() for s in steps]


@pytest.fixture(scope="module")
def rows() -> dict[str, dict[str, dict]]:
    """`python -m model roadmap`'s rows, per regime and step key: the figures the tests check are the ones printed."""
    return {regime: {r["key"]: r for r in roadmap_rows(regime)} for regime in REGIMES}


def test_every_row_of_tables_10_and_11_is_a_registered_model():
    assert [s.label for s in STEPS["r50"]] == TABLE_10_LABELS
    assert [s.label for s in STEPS["r200"]][-1] == "separate d.s. conv (ConvNeXt-B)"
    assert len(STEPS["r200"]) == 17 and STEPS["r200"][2].label == "stage ratio and increase width"
    assert STEPS["r50"][0].model == "resnet50"  # row 0 is the registry's torchvision ResNet-50, the PyTorch recipe
    assert STEPS["r200"][0].model == STEPS["r200"][1].model  # ResNet-200: the same network, two recipes
    registered = [s.model for steps in STEPS.values() for s in steps if s.recipe == "enhanced"]
    assert len(set(registered)) == 32 and set(registered) <= set(model.list_models())
    assert all(model.get_config(name).family == "roadmap" for name in ROADMAP_MODELS)


@pytest.mark.parametrize("step", STEP_PARAMS)
def test_step_gmacs_match_the_paper_or_say_why_not(step, rows):
    row = rows[step.regime][step.key]
    if step.gflops_note is None:
        assert abs(row["gmacs"] - step.gflops) / step.gflops <= 0.01, (row["gmacs"], step.gflops)
        return
    # The documented exception (Table 10, BN -> LN): it must really not match, and keep its parent's MACs.
    parent = rows[step.regime][step.parent]
    assert abs(row["gmacs"] - step.gflops) / step.gflops > 0.01
    assert row["gmacs"] == parent["gmacs"] and parent["paper_gflops"] == 4.15 and step.gflops == 4.46


def test_bn_to_ln_exception_arithmetic_holds():
    """LayerNorm at fvcore's 5 FLOPs per normalised element is ~0.011 G, nowhere near Table 10's +0.31 G."""
    with torch.device("meta"):
        net = model.create_model("roadmap_r50_layernorm").eval()
    elements = []
    for module in net.modules():
        if isinstance(module, nn.LayerNorm):
            module.register_forward_hook(lambda m, i, out: elements.append(out.numel()))
    net(torch.empty(1, 3, 224, 224, device="meta"))
    note = ROADMAP_MODELS["roadmap_r50_layernorm"].gflops_note
    assert sum(elements) == 2_276_736 and f"{sum(elements):,}" in note
    assert round(5 * sum(elements) / 1e9, 3) == 0.011 and "0.011 G" in note
    assert not any(s.gflops_note for s in STEPS["r200"])  # Table 11's BN -> LN keeps 14.81


@pytest.mark.parametrize(("name", "final"), [("roadmap_r50_separate_downsampling", "convnext_tiny"),
                                             ("roadmap_r200_separate_downsampling", "convnext_base")])
def test_last_step_has_convnext_state_dict(name, final):
    with torch.device("meta"):
        step, convnext = model.create_model(name), model.create_model(final)
    assert {k: v.shape for k, v in step.state_dict().items()} == {k: v.shape for k, v in convnext.state_dict().items()}
    assert model.get_config(name).layer_scale_init == model.get_config(final).layer_scale_init == 1e-6


def test_last_r50_step_is_convnext_tiny_with_the_same_weights():
    torch.manual_seed(0)
    convnext = model.create_model("convnext_tiny").eval()
    model.draw_layer_scales(convnext)  # at 1e-6 the blocks' outputs reached the logits only as rounding noise
    step = model.create_model("roadmap_r50_separate_downsampling").eval()
    step.load_state_dict(convnext.state_dict(), strict=True)  # an official ConvNeXt-T checkpoint loads as is
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(step(x), convnext(x))


def _torchvision_to_roadmap(key: str) -> str:
    """torchvision ResNet names -> RoadmapNet names (stem conv/bn, layerN.i.convK/bnK/downsample, fc)."""
    stem = {"conv1.": "downsample_layers.0.0.", "bn1.": "downsample_layers.0.1.", "fc.": "head."}
    for prefix, new in stem.items():
        if key.startswith(prefix):
            return new + key[len(prefix):]
    stage, block, layer, rest = re.fullmatch(r"layer(\d)\.(\d+)\.(\w+)\.(.+)", key).groups()
    layer = {"conv1": "pwconv1", "bn1": "norm1", "conv2": "dwconv", "bn2": "norm", "conv3": "pwconv2", "bn3": "norm2",
             "downsample": "shortcut"}[layer]
    return f"stages.{int(stage) - 1}.{block}.{layer}.{rest}"


def test_first_r50_step_is_torchvision_resnet50_with_the_same_weights():
    torch.manual_seed(0)
    torchvision_resnet = model.create_model("resnet50").eval()
    step = model.create_model("roadmap_r50_resnet50").eval()
    step.load_state_dict({_torchvision_to_roadmap(k): v for k, v in torchvision_resnet.state_dict().items()})
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(step(x), torchvision_resnet(x), rtol=1e-5, atol=1e-5)


def test_first_r200_step_is_torchvision_bottleneck_resnet200():
    with torch.device("meta"):
        resnet200 = ResNet(Bottleneck, [3, 24, 36, 3])
        step = model.create_model("roadmap_r200_resnet200")
    renamed = {_torchvision_to_roadmap(k): v.shape for k, v in resnet200.state_dict().items()}
    assert renamed == {k: v.shape for k, v in step.state_dict().items()}


def _anatomy(net: nn.Module) -> dict:
    blocks = [m for m in net.modules() if hasattr(m, "pwconv1")]
    return {
        "activations": sum(isinstance(m, (nn.ReLU, nn.GELU)) for b in blocks for m in b.children()) / len(blocks),
        "norms": sum(isinstance(m, (nn.BatchNorm2d, nn.LayerNorm)) for b in blocks for m in b.children()) / len(blocks),
        "gelu": any(isinstance(m, nn.GELU) for m in net.modules()),
        "batchnorm": any(isinstance(m, nn.BatchNorm2d) for m in net.modules()),
        "depthwise": all(b.dwconv.groups == b.dwconv.in_channels for b in blocks),
        "kernel": {b.dwconv.kernel_size[0] for b in blocks},
        "stem": type(net.downsample_layers[0][-1]).__name__,
        "separate_downsampling": not isinstance(net.downsample_layers[1], nn.Identity),
    }


def test_each_step_builds_what_its_row_says():
    with torch.device("meta"):
        anatomy = {s.key: _anatomy(model.create_model(s.model)) for s in STEPS["r50"][1:]}
    assert anatomy["resnet50"] == {"activations": 3, "norms": 3, "gelu": False, "batchnorm": True, "depthwise": False,
                                   "kernel": {3}, "stem": "MaxPool2d", "separate_downsampling": False}
    assert anatomy["patchify_stem"]["stem"] == "Conv2d" and not anatomy["stage_ratio"]["depthwise"]
    assert anatomy["depthwise"]["depthwise"] and [anatomy[f"kernel{k}"]["kernel"] for k in (5, 7, 9, 11)] == [
        {5}, {7}, {9}, {11}]
    assert anatomy["gelu"]["gelu"] and not anatomy["kernel7"]["gelu"] and anatomy["gelu"]["kernel"] == {7}
    assert (anatomy["gelu"]["activations"], anatomy["fewer_activations"]["activations"]) == (3, 1)
    assert (anatomy["fewer_activations"]["norms"], anatomy["fewer_norms"]["norms"]) == (3, 1)
    assert anatomy["fewer_norms"]["batchnorm"] and not anatomy["layernorm"]["batchnorm"]
    assert not anatomy["layernorm"]["separate_downsampling"]
    assert anatomy["separate_downsampling"]["separate_downsampling"]


def test_r200_designs_are_r50_designs_at_other_depths_and_widths():
    """Both tables make the same edits; only the ResNet-200 regime's depths and widths differ (Appendix C)."""
    for r50, r200 in zip(STEPS["r50"], STEPS["r200"], strict=True):
        assert replace(r200.design, depths=r50.design.depths, width=r50.design.width) == r50.design


def test_create_model_options_on_a_step():
    step = model.create_model("roadmap_r50_gelu", layer_scale_init=0.5, drop_path_rate=0.2, num_classes=7)
    blocks = [m for m in step.modules() if hasattr(m, "pwconv1")]
    assert all(torch.all(b.gamma == 0.5) for b in blocks) and step.head.out_features == 7
    assert blocks[0].drop_path.drop_prob == 0.0 and blocks[-1].drop_path.drop_prob == pytest.approx(0.2)
    assert all(b.gamma is None for b in model.create_model("roadmap_r50_gelu").modules() if hasattr(b, "gamma"))
    assert model.create_model("roadmap_r50_gelu", activation="gelu") is not None
    with pytest.raises(ValueError, match="defined with gelu.*the step with relu is roadmap_r50_kernel7$"):
        model.create_model("roadmap_r50_gelu", activation="relu")  # the row before "ReLU -> GELU"
    with pytest.raises(ValueError, match="defined with relu.*the step with gelu is roadmap_r50_gelu$"):
        model.create_model("roadmap_r50_kernel7", activation="gelu")
    with pytest.raises(ValueError, match="no step has this design with relu$"):  # after GELU the roadmap keeps it
        model.create_model("roadmap_r50_fewer_activations", activation="relu")


@pytest.mark.parametrize(("edits", "message"), [
    (dict(norm="ln"), "set one_norm=True"),
    (dict(dwconv_first=True), "set inverted=True"),
    (dict(kernel_size=4), "must be odd"),
    (dict(stem="conv"), "choose from"),
])
def test_design_refuses_what_the_network_cannot_build(edits, message):
    with pytest.raises(ValueError, match=message):
        Design(**edits)


def test_design_fields_are_documented_and_networks_build_on_cpu():
    assert {f.name for f in fields(Design)} >= {"depths", "width", "stem", "depthwise", "inverted", "dwconv_first",
                                                "kernel_size", "activation", "one_activation", "one_norm", "norm",
                                                "separate_downsampling", "layer_scale_init"}
    net = RoadmapNet(replace(ROADMAP_MODELS["roadmap_r50_layernorm"].design, width=8, depths=(1, 1)), num_classes=3)
    assert net(torch.randn(2, 3, 32, 32)).shape == (2, 3)


def test_roadmap_cli_prints_each_step_with_the_paper_and_the_exception(capsys):
    assert main(["roadmap"]) == 0
    out = capsys.readouterr().out
    table = [line for line in out.splitlines() if re.match(r"\| \d+ \|", line)]
    assert len(table) == 17
    assert "| 12 | ReLU -> GELU | roadmap_r50_gelu | 25.86 | 4.15 | 4.15 | -0.1% | 80.62 +/- 0.14 | +0.05 (vs " \
           "kernel size -> 7) |" in table
    assert "| 15 | BN -> LN | roadmap_r50_layernorm | 25.84 | 4.15 | 4.46 | -7.0% (see note) |" in table[15]
    assert "multiply-accumulates of conv and linear layers" in out and "Note on 'BN -> LN'" in out
    assert "MISMATCH" not in out


def test_a_selection_of_steps_reads_as_in_the_whole_table():
    whole = format_roadmap("r50", roadmap_rows("r50")).splitlines()
    keys = ["resnet50_original", "stage_ratio", "kernel11", "gelu"]  # rows 0, 2, 11, 12: not one after another
    selected = [line for line in format_roadmap("r50", roadmap_rows("r50", keys)).splitlines()
                if re.match(r"\| \d+ \|", line)]
    assert selected == [line for line in whole if re.match(r"\| (0|2|11|12) \|", line)]
    assert selected[1].endswith("| +0.54 |") and selected[3].endswith("| +0.05 (vs kernel size -> 7) |")


def test_roadmap_cli_json_for_the_resnet200_regime(capsys, rows):
    assert main(["roadmap", "--regime", "r200", "--json"]) == 0
    document = json.loads(capsys.readouterr().out)
    assert document["source"] == "Table 11" and len(document["rows"]) == 17
    assert all(r["matches_paper"] for r in document["rows"])
    assert {r["key"]: r["gmacs"] for r in document["rows"]} == {k: r["gmacs"] for k, r in rows["r200"].items()}
    last = document["rows"][-1]
    assert (last["model"], last["top1"], last["delta_top1"]) == ("roadmap_r200_separate_downsampling", 83.6, 0.25)
