"""A random-init export's parity check sees its blocks: with the layer-scale gammas drawn near 1 (not Table 5's 1e-6
init, which scales every block's branch to ~1e-6 of the logits), an ONNX file whose block weights were mis-mapped
fails fp32 parity against PyTorch. It once passed with max diff 1.7e-6 and top-1/top-5 1.0."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from runtime.verify import ParityError, image_paths_in, run_onnxruntime, verification_inputs, verify_outputs


def _scrambled(graph: onnx.ModelProto, which: str) -> tuple[onnx.ModelProto, int]:
    """A copy of `graph` whose block weights named by `which` ("dwconv": the 7x7 depthwise kernels, "pwconv": the
    pointwise layers' matrices, the only MatMul weights) are each a seeded permutation of their own values: what a
    mis-mapped or mis-transposed weight looks like. Returns it and how many weights were scrambled."""
    scrambled = onnx.ModelProto()
    scrambled.CopyFrom(graph)
    users: dict[str, set[str]] = {}
    for node in scrambled.graph.node:
        for name in node.input:
            users.setdefault(name, set()).add(node.op_type)
    rng = np.random.default_rng(0)
    count = 0
    for init in scrambled.graph.initializer:
        is_dwconv = init.name.endswith("dwconv.weight")
        is_pwconv = users.get(init.name) == {"MatMul"}  # the head is a Gemm: not one of these
        if (which == "dwconv" and is_dwconv) or (which == "pwconv" and is_pwconv):
            array = numpy_helper.to_array(init)
            init.CopyFrom(numpy_helper.from_array(rng.permutation(array.ravel()).reshape(array.shape), init.name))
            count += 1
    return scrambled, count


@pytest.fixture(scope="module")
def photos_and_reference(exported, atto_module, photo_folder):
    inputs = verification_inputs(exported.manifest.preprocess, image_paths_in(photo_folder))
    with torch.no_grad():
        return inputs, atto_module(torch.from_numpy(inputs.batch)).numpy()


def test_the_export_itself_passes_fp32_parity(exported, photos_and_reference):
    """The control: the same check on the unscrambled file passes, so the failures below are the scrambling's."""
    inputs, reference = photos_and_reference
    logits = run_onnxruntime(exported.artifact_path(exported.manifest.find("onnx", "fp32")), inputs.batch)
    parity = verify_outputs(reference, logits, inputs, "fp32", "pytorch-fp32", "ONNX fp32")
    assert parity.top1_agreement == 1.0 and parity.max_abs_diff < 1e-5 * np.abs(reference).max()


@pytest.mark.parametrize(("which", "expected_count"), [("dwconv", 12), ("pwconv", 24)])
def test_scrambled_block_weights_fail_fp32_parity(exported, photos_and_reference, tmp_path, which, expected_count):
    inputs, reference = photos_and_reference
    graph = onnx.load(str(exported.artifact_path(exported.manifest.find("onnx", "fp32"))))
    scrambled, count = _scrambled(graph, which)
    assert count == expected_count  # convnext_atto's 12 blocks: one depthwise kernel and two pointwise matrices each
    onnx.save(scrambled, str(tmp_path / "scrambled.onnx"))
    logits = run_onnxruntime(tmp_path / "scrambled.onnx", inputs.batch)
    with pytest.raises(ParityError, match=r"max abs diff .* of the logit scale"):
        verify_outputs(reference, logits, inputs, "fp32", "pytorch-fp32", "ONNX fp32")
