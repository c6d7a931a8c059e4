"""GPU: export -> TensorRT engine (fp16, bf16) -> parity against ONNX Runtime fp32, recorded in the manifest."""
from __future__ import annotations

import importlib.util
import shutil

import pytest

pytestmark = pytest.mark.gpu


def _gpu_reason() -> str | None:
    if importlib.util.find_spec("tensorrt") is None:
        return "needs an NVIDIA GPU with TensorRT installed (pip install -e '.[gpu]')"
    if importlib.util.find_spec("cuda") is None:
        return "needs an NVIDIA GPU with cuda-python installed"
    if shutil.which("nvidia-smi") is None:
        return "needs an NVIDIA GPU (nvidia-smi not found)"
    return None


@pytest.fixture(scope="module")
def version(tmp_path_factory, real_photos):
    reason = _gpu_reason()
    if reason:
        pytest.skip(reason)
    from export.onnx import export_onnx_version

    return export_onnx_version(tmp_path_factory.mktemp("repo"), "atto", "convnext_atto",
                               precisions=("fp32", "fp16", "bf16"), verify_images=real_photos[0].parent)


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_engine_builds_verifies_and_is_cached(version, precision):
    from export.repository import ModelRepository
    from export.tensorrt import BatchProfile, select_or_build_engine

    profile = BatchProfile(1, 4, 8)
    artifact, updated = select_or_build_engine(version, precision, profile)
    assert artifact.parity.reference == "onnxruntime-fp32" and artifact.parity.top1_agreement >= 0.99
    assert artifact.tensorrt.max_batch == 8 and artifact.file.startswith(f"engines/model.{precision}.trt")
    reloaded = ModelRepository(updated.path.parent.parent).load("atto", updated.manifest.version)
    assert artifact in reloaded.manifest.artifacts
    again, _ = select_or_build_engine(reloaded, precision, BatchProfile(1, 2, 4))  # covered: no rebuild
    assert again == artifact
