"""The bf16 ONNX variant (for strongly typed TensorRT 11): bf16 convs and matmuls, fp32 LayerNorms, verified."""
from __future__ import annotations

import ml_dtypes
import numpy as np
import onnx
import pytest
from onnx import TensorProto, numpy_helper

from export.__main__ import main
from export.bf16 import BF16_MIN_OPSET, run_reference
from export.onnx import export_onnx_version
from runtime.verify import run_onnxruntime


@pytest.fixture(scope="module")
def bf16_version(tmp_path_factory, real_photos):
    root = tmp_path_factory.mktemp("bf16")
    return export_onnx_version(root, "atto", "convnext_atto", num_classes=10, input_size=32,
                               precisions=("fp32", "bf16"), verify_images=real_photos)


def _typed(version, precision):
    path = version.artifact_path(version.manifest.find("onnx", precision))
    model = onnx.shape_inference.infer_shapes(onnx.load(str(path)), strict_mode=True)
    types = {v.name: v.type.tensor_type.elem_type for v in (*model.graph.value_info, *model.graph.input)}
    types |= {i.name: i.data_type for i in model.graph.initializer}
    return model, types, path


def test_bf16_variant_is_verified_and_recorded(bf16_version):
    artifact = bf16_version.manifest.find("onnx", "bf16")
    assert artifact.file == "model.bf16.onnx"
    assert artifact.parity.reference == "onnxruntime-fp32" and artifact.parity.num_real_images == 4
    assert artifact.parity.top1_agreement == 1.0
    assert 0 < artifact.parity.max_abs_diff  # it really computed in bf16, not silently in fp32


def test_convs_and_matmuls_run_in_bf16_and_layernorms_in_fp32(bf16_version):
    model, types, _ = _typed(bf16_version, "bf16")
    assert next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) >= BF16_MIN_OPSET
    assert TensorProto.FLOAT16 not in types.values()
    by_op = {}
    for node in model.graph.node:
        by_op.setdefault(node.op_type, []).append(types.get(node.input[0]))
    assert by_op["Conv"] and set(by_op["Conv"]) == {TensorProto.BFLOAT16}
    assert by_op["MatMul"] and set(by_op["MatMul"]) == {TensorProto.BFLOAT16}
    assert by_op["LayerNormalization"] and set(by_op["LayerNormalization"]) == {TensorProto.FLOAT}
    assert model.graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT
    assert model.graph.output[0].type.tensor_type.elem_type == TensorProto.FLOAT


def test_bf16_weights_are_the_fp32_weights_rounded_once(bf16_version):
    fp32 = onnx.load(str(bf16_version.artifact_path(bf16_version.manifest.find("onnx", "fp32"))))
    bf16 = onnx.load(str(bf16_version.artifact_path(bf16_version.manifest.find("onnx", "bf16"))))
    originals = {i.name: numpy_helper.to_array(i) for i in fp32.graph.initializer}
    checked = 0
    for init in bf16.graph.initializer:
        if init.data_type == TensorProto.BFLOAT16 and init.name in originals:
            expected = originals[init.name].astype(ml_dtypes.bfloat16)
            np.testing.assert_array_equal(numpy_helper.to_array(init).astype(np.float32), expected.astype(np.float32))
            checked += 1
    assert checked >= 10


def test_reference_evaluator_agrees_with_onnxruntime_on_the_fp32_model(bf16_version):
    """The bf16 check runs on the ONNX reference evaluator: on fp32 it must equal ONNX Runtime."""
    path = bf16_version.artifact_path(bf16_version.manifest.find("onnx", "fp32"))
    batch = np.random.default_rng(0).standard_normal((2, 3, 32, 32)).astype(np.float32)
    np.testing.assert_allclose(run_reference(path, batch), run_onnxruntime(path, batch), atol=1e-4, rtol=1e-4)


def test_each_onnx_artifact_records_its_own_opset_and_list_prints_it(bf16_version, capsys):
    """The bf16 file is opset 22 while model.onnx is 18: the manifest and `export list` say so per file."""
    manifest = bf16_version.manifest
    for artifact in manifest.artifacts:
        model = onnx.load(str(bf16_version.artifact_path(artifact)), load_external_data=False)
        assert artifact.onnx_opset == next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    assert (manifest.onnx_opset, manifest.find("onnx", "fp32").onnx_opset) == (18, 18)
    assert manifest.find("onnx", "bf16").onnx_opset == BF16_MIN_OPSET
    assert main(["list", "--repository", str(bf16_version.path.parent.parent)]) == 0
    lines = {line.split()[0]: line for line in capsys.readouterr().out.splitlines() if line.startswith("  ")}
    assert " opset 18 " in lines["model.onnx"] and f" opset {BF16_MIN_OPSET} " in lines["model.bf16.onnx"]
