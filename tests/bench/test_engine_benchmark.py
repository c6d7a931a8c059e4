"""bench.engine_benchmark on a real fp16 export: TensorRT's options follow the artifact's precision (its file keeps
fp32 inputs, so it cannot tell), over the profile the caller asks for; the fp16 file runs on the CPU provider with the
float32 batch every exported precision takes. Options are only built here: no GPU needed."""
from __future__ import annotations

import onnx
import pytest

from bench.engine_benchmark import benchmark_onnx, gpu_provider_options
from runtime.repository import ModelRepository


@pytest.fixture(scope="module")
def fp16_onnx(tmp_path_factory):
    import torch

    from export.onnx import export_onnx_version

    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("bench-fp16")
    export_onnx_version(root, "atto", "convnext_atto", num_classes=10, input_size=32, precisions=("fp32", "fp16"),
                        verify_images=[])
    version = ModelRepository(root).load("atto")
    return version.artifact_path(version.manifest.find("onnx", "fp16"))


def test_an_fp16_artifact_keeps_float32_inputs_so_its_file_cannot_tell_its_precision(fp16_onnx):
    graph_input = onnx.load(str(fp16_onnx), load_external_data=False).graph.input[0]
    assert graph_input.type.tensor_type.elem_type == onnx.TensorProto.FLOAT


def test_tensorrt_options_of_an_fp16_artifact_enable_fp16_over_the_asked_profile(fp16_onnx):
    options = gpu_provider_options(fp16_onnx, "tensorrt", "fp16", max_batch_size=16)["tensorrt"]
    assert options["trt_fp16_enable"] == options["trt_layer_norm_fp32_fallback"] == "True"
    assert options["trt_profile_max_shapes"] == options["trt_profile_opt_shapes"] == "input:16x3x32x32"
    fp32 = gpu_provider_options(fp16_onnx, "tensorrt", "fp32", max_batch_size=4)["tensorrt"]
    assert fp32["trt_fp16_enable"] == "False" and fp32["trt_profile_max_shapes"] == "input:4x3x32x32"


def test_tensorrt_options_without_a_precision_are_refused_naming_the_flag(fp16_onnx):
    with pytest.raises(ValueError, match="--precision"):
        gpu_provider_options(fp16_onnx, "tensorrt", None, max_batch_size=8)
    assert "tensorrt" not in gpu_provider_options(fp16_onnx, "cuda", None, None)  # CUDA needs neither


def test_an_fp16_artifact_runs_on_the_cpu_provider_with_a_float32_batch(fp16_onnx):
    (row,) = benchmark_onnx(fp16_onnx, [2], threads=1, warmup=1, iterations=2, precision="fp16")
    assert row.precision == "fp16" and row.images_per_s > 0 and row.iterations == 2


def test_a_profile_smaller_than_the_largest_timed_batch_is_refused(fp16_onnx):
    with pytest.raises(ValueError, match="under the largest batch size timed, 4"):
        benchmark_onnx(fp16_onnx, [1, 4], threads=1, iterations=1, max_batch_size=2)


@pytest.mark.filterwarnings("ignore:the float32 number:UserWarning")  # the converter's note on tiny weights
def test_a_file_from_elsewhere_with_float16_inputs_is_timed_with_a_float16_batch(fp16_onnx, tmp_path):
    from onnxconverter_common import float16

    fp32 = onnx.load(str(fp16_onnx.with_name("model.onnx")))
    half_io = tmp_path / "half_io.onnx"
    onnx.save(float16.convert_float_to_float16(fp32, keep_io_types=False), str(half_io))
    assert onnx.load(str(half_io)).graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT16
    (row,) = benchmark_onnx(half_io, [2], threads=1, warmup=1, iterations=2, precision="fp16")
    assert row.images_per_s > 0
