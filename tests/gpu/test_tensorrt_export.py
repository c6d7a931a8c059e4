"""GPU: export -> TensorRT engine (fp16, bf16 from Ampere on) -> parity against ONNX Runtime fp32, recorded in the
manifest."""
from __future__ import annotations

import importlib.util
import shutil

import numpy as np
import pytest

pytestmark = pytest.mark.gpu


def _gpu_reason() -> str | None:
    if importlib.util.find_spec("tensorrt") is None:
        return "needs an NVIDIA GPU with TensorRT installed (bash scripts/gpu_check.sh sets up such a venv)"
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


@pytest.mark.parametrize("precision", ["fp32", "fp16", "bf16"])
def test_engine_builds_verifies_and_is_cached(version, precision, capfd):
    from bench.roadmap_engines import bf16_problem
    from runtime.repository import ModelRepository
    from runtime.tensorrt import BatchProfile, select_or_build_engine, tensorrt_target
    from runtime.tensorrt_files import device_tag, timing_cache_name

    target = tensorrt_target()
    problem = bf16_problem(target.compute_capability, target.device_name) if precision == "bf16" else None
    if problem:  # scripts/gpu_check.sh allows this skip on such a GPU (and skips its own bf16 step)
        pytest.skip(problem)
    # Max batch 8 under 10 verification inputs (4 random + 6 photos): parity runs in calls within the profile.
    profile = BatchProfile(1, 4, 8)
    artifact, updated = select_or_build_engine(version, precision, profile)
    assert "TensorRT build: " in capfd.readouterr().err  # the build's phases, from TensorRT's progress monitor
    assert artifact.parity.reference == "onnxruntime-fp32" and artifact.parity.num_inputs == 10
    assert artifact.tensorrt.max_batch == 8 and artifact.file.startswith(f"engines/model.{precision}.trt")
    assert artifact.tensorrt.tensorrt_version in artifact.file  # the full TensorRT version
    assert f".{device_tag(target)}." in artifact.file and artifact.tensorrt.device_name == target.device_name
    assert (updated.path.parent.parent / timing_cache_name(target)).stat().st_size > 0  # this GPU's timing cache
    reloaded = ModelRepository(updated.path.parent.parent).load("atto", updated.manifest.version)
    assert artifact in reloaded.manifest.artifacts
    again, _ = select_or_build_engine(version, precision, BatchProfile(1, 2, 4))  # stale version, covered: no rebuild
    assert again == artifact


def test_an_engine_that_does_not_deserialize_is_rebuilt_at_service_start(version, tmp_path):
    from runtime.engines.tensorrt import open_tensorrt_engine
    from runtime.repository import ModelRepository, describe_file
    from runtime.tensorrt import BatchProfile, select_or_build_engine

    good, current = select_or_build_engine(version, "fp32", BatchProfile(1, 4, 8))
    garbage = tmp_path / "garbage.engine"
    garbage.write_bytes(b"not an engine")
    broken = describe_file(tmp_path, garbage.name, format="tensorrt", precision="fp32",
                           tensorrt=good.tensorrt).model_copy(update={"file": good.file})
    repository = ModelRepository(current.path.parent.parent)
    repository.add_artifact("atto", current.manifest.version, garbage, broken)  # same name: replaces the engine
    engine = open_tensorrt_engine(version, "fp32", good.tensorrt.max_batch, repository.root)  # rebuilds it once
    try:
        rebuilt = [a for a in engine.model.manifest.artifacts if a.file == good.file]
        assert len(rebuilt) == 1 and rebuilt[0].sha256 != broken.sha256
        m = engine.model.manifest
        batch = np.zeros((10, m.input.channels, m.input.height, m.input.width), np.float32)
        assert engine.run(batch).shape == (10, m.num_classes)  # two calls: 8 + 2
    finally:
        engine.close()
