"""A bf16 ONNX variant for strongly typed TensorRT (11.x has no BF16 builder flag: the precision lives in the graph).

It is the fp16 variant's graph (same fp32 islands: LayerNorm and its reduction pieces stay fp32, inputs and
outputs stay fp32) with every float16 type, cast and constant turned into bfloat16, and the weights rounded from
the original fp32 values (not from their fp16 copies, which fp16's narrow range has clipped). Conv takes
bfloat16 only from ONNX opset 22, so the variant is written at opset 22 or newer.

ONNX Runtime has no bfloat16 Conv kernel, so the variant is verified with the ONNX reference evaluator (numpy,
slow: a subset of the verification inputs) against ONNX Runtime fp32; TensorRT verifies its engine again.
"""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np

# Kept in fp32 in the fp16 model (export/quantize.py) and so in the bf16 model made from it: the normalisation ops.
# LayerNorm's mean/variance over 768+ channels overflow or lose precision in fp16 (the known fp16 LayerNorm
# pitfall), and the reductions/pow/softmax are its pieces when a norm is decomposed.
FP16_OP_BLOCK_LIST = ("LayerNormalization", "Softmax", "ReduceMean", "Pow", "Sqrt", "Erf")

BF16_MIN_OPSET = 22
# The reference evaluator is pure numpy: verify on at most this many inputs (the real photos first).
MAX_REFERENCE_INPUTS = 4


def _bf16_tensor(array: np.ndarray, name: str):
    import ml_dtypes
    from onnx import numpy_helper

    return numpy_helper.from_array(np.asarray(array, dtype=np.float32).astype(ml_dtypes.bfloat16), name)


def fp16_graph_to_bf16(model16, fp32_weights: dict[str, np.ndarray]) -> int:
    """Rewrite float16 to bfloat16 in place (initializers, Cast targets, Constants, value types); returns count."""
    from onnx import TensorProto, numpy_helper

    changed = 0
    graph = model16.graph
    for i, init in enumerate(graph.initializer):
        if init.data_type == TensorProto.FLOAT16:
            values = fp32_weights.get(init.name)
            if values is None:
                values = numpy_helper.to_array(init).astype(np.float32)
            graph.initializer[i].CopyFrom(_bf16_tensor(values.reshape(tuple(init.dims)), init.name))
            changed += 1
    for node in graph.node:
        for attribute in node.attribute:
            if node.op_type == "Cast" and attribute.name == "to" and attribute.i == TensorProto.FLOAT16:
                attribute.i = TensorProto.BFLOAT16
                changed += 1
            elif attribute.type == attribute.TENSOR and attribute.t.data_type == TensorProto.FLOAT16:
                attribute.t.CopyFrom(_bf16_tensor(numpy_helper.to_array(attribute.t).astype(np.float32),
                                                  attribute.t.name))
                changed += 1
    for value in (*graph.value_info, *graph.input, *graph.output):
        if value.type.tensor_type.elem_type == TensorProto.FLOAT16:
            value.type.tensor_type.elem_type = TensorProto.BFLOAT16
            changed += 1
    return changed


def convert_bf16(fp32_path: Path, bf16_path: Path) -> None:
    """fp32 ONNX -> bf16 ONNX (fp32 inputs/outputs and normalisation), opset >= 22."""
    import onnx
    from onnx import numpy_helper, version_converter
    from onnxconverter_common import float16

    model = onnx.load(str(fp32_path))
    weights = {init.name: numpy_helper.to_array(init) for init in model.graph.initializer
               if init.data_type == onnx.TensorProto.FLOAT}
    with warnings.catch_warnings():  # its "truncated to 1e-07" warnings are about fp16 copies replaced below
        warnings.simplefilter("ignore", UserWarning)
        model16 = float16.convert_float_to_float16(
            model, keep_io_types=True, op_block_list=list(FP16_OP_BLOCK_LIST) + list(float16.DEFAULT_OP_BLOCK_LIST),
        )
    # Up-convert after the fp16 pass (the converter mishandles shared initializers in a converted graph).
    opset = next(o.version for o in model16.opset_import if o.domain in ("", "ai.onnx"))
    if opset < BF16_MIN_OPSET:
        model16 = version_converter.convert_version(model16, BF16_MIN_OPSET)
    if fp16_graph_to_bf16(model16, weights) == 0:
        raise ValueError(f"{fp32_path} has no float tensors to convert to bfloat16")
    onnx.checker.check_model(model16, full_check=True)
    onnx.save(model16, str(bf16_path))


def run_reference(onnx_path: Path, batch: np.ndarray) -> np.ndarray:
    """Run a model with the ONNX reference evaluator (any type the spec allows, bfloat16 included)."""
    from onnx.reference import ReferenceEvaluator

    evaluator = ReferenceEvaluator(str(onnx_path))
    input_name = evaluator.input_names[0]
    return np.concatenate([evaluator.run(None, {input_name: batch[i : i + 1]})[0] for i in range(len(batch))])
