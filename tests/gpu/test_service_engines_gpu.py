"""GPU engines of the service: native TensorRT (built from the ONNX here) and ONNX Runtime's CUDA provider."""
from __future__ import annotations

import importlib.util

import numpy as np
import onnxruntime as ort
import pytest

from runtime.ort_session import cuda_provider_options

pytestmark = pytest.mark.gpu


def needs(module: str) -> None:
    if importlib.util.find_spec(module) is None:
        pytest.skip(f"{module} is not installed: this test needs an NVIDIA GPU host with the gpu extra")


@pytest.fixture(scope="module")
def atto(tmp_path_factory):
    from export.onnx import export_onnx_version

    root = tmp_path_factory.mktemp("models")
    return export_onnx_version(root, "atto", "convnext_atto", num_classes=10, input_size=64)


def reference(version, batch):
    session = ort.InferenceSession(str(version.path / version.manifest.artifacts[0].file),
                                   providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: batch})[0]


def build_engine(onnx_path, plan_path, max_batch: int) -> None:
    import tensorrt as trt

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    assert parser.parse(onnx_path.read_bytes()), [parser.get_error(i) for i in range(parser.num_errors)]
    config = builder.create_builder_config()
    profile = builder.create_optimization_profile()
    profile.set_shape("input", (1, 3, 64, 64), (max_batch // 2, 3, 64, 64), (max_batch, 3, 64, 64))
    config.add_optimization_profile(profile)
    plan_path.write_bytes(bytes(builder.build_serialized_network(network, config)))


def test_tensorrt_engine_matches_onnxruntime_at_every_batch_size(request, tmp_path):
    needs("tensorrt")
    needs("cuda")
    atto = request.getfixturevalue("atto")
    from runtime.engines.tensorrt import TensorRTEngine

    plan = tmp_path / "model.plan"
    build_engine(atto.path / atto.manifest.artifacts[0].file, plan, max_batch=8)
    engine = TensorRTEngine(plan, (3, 64, 64), precision="fp32", max_batch_size=8)
    engine.load()
    engine.warmup(1)
    assert engine.describe().max_batch_size == 8
    rng = np.random.default_rng(0)
    for size in (1, 3, 8, 11):  # 11: two engine calls within the profile (8 + 3)
        batch = rng.standard_normal((size, 3, 64, 64), dtype=np.float32)
        np.testing.assert_allclose(engine.run(batch), reference(atto, batch), atol=1e-2)
    engine.close()


def test_onnxruntime_cuda_provider_matches_cpu(request):
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("onnxruntime has no CUDAExecutionProvider: this test needs an NVIDIA GPU with onnxruntime-gpu "
                    "instead of onnxruntime (bash scripts/gpu_check.sh)")
    atto = request.getfixturevalue("atto")
    from runtime.engines.onnxruntime import OnnxRuntimeEngine

    # The service's options (TF32 off): fp32 within 1e-3 of the CPU.
    engine = OnnxRuntimeEngine(atto.path / atto.manifest.artifacts[0].file, (3, 64, 64), provider="cuda",
                               provider_options={"cuda": cuda_provider_options()})
    engine.load()
    batch = np.random.default_rng(1).standard_normal((4, 3, 64, 64), dtype=np.float32)
    np.testing.assert_allclose(engine.run(batch), reference(atto, batch), atol=1e-3)
