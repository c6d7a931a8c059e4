"""ONNX Runtime providers: a GPU provider that does not load is refused with a clear error (never a quiet CPU run),
and the CUDA / TensorRT providers get the documented options (TensorRT: caches in the version, the batch profile).

The refusal is proven with the real GPU build of ONNX Runtime (onnxruntime-gpu) on this GPU-less machine: it lists
the CUDA and TensorRT providers, whose libraries then fail to load. That build is kept out of the shared virtual
environment (it would replace the CPU package): `make test` installs it into .venv/ort-gpu-probe, and the check runs in
a subprocess that imports it first.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import get_args

import onnxruntime
import pytest

from runtime.engines.base import EngineError
from runtime.engines.onnxruntime import OnnxRuntimeEngine
from runtime.ort_session import (
    PROVIDERS,
    ProviderError,
    create_session,
    cuda_provider_options,
    ort_tensorrt_cache_dir,
    provider_chain,
    tensorrt_provider_options,
)
from runtime.repository import ModelRepository, describe_file
from service.app import default_engine
from service.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
ORT_GPU = ROOT / ".venv" / "ort-gpu-probe"
INSTALL_ORT_GPU = (f"make {ORT_GPU.relative_to(ROOT)}/.installed  (or: python -m pip install --no-deps --target "
                   f"{ORT_GPU.relative_to(ROOT)} onnxruntime-gpu=={onnxruntime.__version__})")

# Runs with the GPU build first on the path: loads the service's engine the way the service does.
LOAD_WITH_GPU_BUILD = """
import json, sys
import onnxruntime
from onnxruntime.capi import build_and_package_info
from runtime.repository import ModelRepository, describe_file
from service.app import default_engine
from runtime.engines.base import EngineError
from service.settings import Settings

root, provider = sys.argv[1], sys.argv[2]
engine = default_engine(ModelRepository(root).load("atto"), Settings(repository=root, provider=provider))
report = {"file": onnxruntime.__file__, "device": onnxruntime.get_device(), "version": onnxruntime.__version__,
          "package": build_and_package_info.package_name, "available": onnxruntime.get_available_providers()}
try:
    engine.load()
    report["error"] = None
except EngineError as err:
    report["error"] = str(err)
print(json.dumps(report))
"""


@pytest.fixture
def private_repository(model_repository, tmp_path) -> Path:
    """A copy of the session's repository: the TensorRT provider creates its cache folder inside the version."""
    root = tmp_path / "models"
    shutil.copytree(model_repository, root)
    return root


@pytest.mark.parametrize("provider", ["cuda", "tensorrt"])
def test_the_gpu_build_on_a_host_without_gpu_libraries_refuses_the_provider_at_load(provider, private_repository):
    if not (ORT_GPU / "onnxruntime").is_dir():
        pytest.fail(f"the GPU build of ONNX Runtime is not in {ORT_GPU}; install it with: {INSTALL_ORT_GPU}")
    env = {**os.environ, "PYTHONPATH": f"{ORT_GPU}{os.pathsep}{ROOT}"}
    done = subprocess.run([sys.executable, "-c", LOAD_WITH_GPU_BUILD, str(private_repository), provider],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.strip().splitlines()[-1])
    # It really is the GPU build, and it offers the provider: the refusal below is not "provider not installed".
    assert Path(report["file"]).is_relative_to(ORT_GPU)
    assert (report["package"], report["device"]) == ("onnxruntime-gpu", "GPU")
    assert report["version"] == onnxruntime.__version__  # the probe tracks the CPU package's release
    assert PROVIDERS[provider] in report["available"] and "CUDAExecutionProvider" in report["available"]
    error = report["error"]
    assert error is not None, "the engine loaded although this machine has no CUDA libraries: it runs on CPU"
    assert PROVIDERS[provider] in error and "python -m service doctor" in error and "nvidia-smi" in error
    if provider == "cuda":  # ORT drops the CUDA provider with a warning and would have run on CPU
        assert "but it loaded ['CPUExecutionProvider']" in error
    else:  # without fallback, creating the TensorRT provider raises; the error names what it needs
        assert "TensorRT 10 (libnvinfer.so.10" in error
    assert "Falling back" not in done.stdout  # ORT's session fallback is off: it never retried on CPU
    assert "Traceback" not in done.stderr
    # The wheels' CUDA libraries were looked for first (onnxruntime.preload_dlls; none here), reported on stderr.
    assert "Failed to load libcublasLt.so.13" in done.stderr and "Failed to load" not in done.stdout


def test_the_cpu_build_asked_for_a_gpu_provider_says_how_to_get_it(model_repository):
    version = ModelRepository(model_repository).load("atto")
    engine = default_engine(version, Settings(repository=str(model_repository), provider="cuda"))
    with pytest.raises(EngineError, match=r"CUDAExecutionProvider is not in this onnxruntime build.*onnxruntime-gpu"):
        engine.load()
    with pytest.raises(EngineError, match="unknown provider 'rocm'"):
        OnnxRuntimeEngine(version.path / "model.onnx", (3, 64, 64), provider="rocm")


def test_a_cpu_session_runs_on_cpu_with_fallback_off(model_repository):
    version = ModelRepository(model_repository).load("atto")
    session = create_session(version.path / "model.onnx", "cpu")
    assert session.get_providers() == ["CPUExecutionProvider"]
    assert session._enable_fallback is False  # ORT's flag behind disable_fallback(); no public getter exists
    with pytest.raises(ProviderError, match="could not load .*missing.onnx on CPUExecutionProvider"):
        create_session(version.path / "missing.onnx", "cpu")


def test_tensorrt_provider_options_cache_in_the_version_and_cover_the_service_batch_range(tmp_path):
    cache = ort_tensorrt_cache_dir(tmp_path / "atto" / "1", "1.31.1")
    assert cache == tmp_path / "atto" / "1" / "engines" / "ort-trt" / "ort-1.31.1"
    options = tensorrt_provider_options(cache, "input", (3, 224, 224), 8, "fp16")
    assert options == {
        "device_id": "0",
        "trt_engine_cache_enable": "True",
        "trt_engine_cache_path": str(cache),
        "trt_timing_cache_enable": "True",
        "trt_timing_cache_path": str(cache),
        "trt_fp16_enable": "True",
        "trt_layer_norm_fp32_fallback": "True",
        "trt_bf16_enable": "False",
        "trt_int8_enable": "False",
        "trt_profile_min_shapes": "input:1x3x224x224",
        "trt_profile_opt_shapes": "input:8x3x224x224",
        "trt_profile_max_shapes": "input:8x3x224x224",
    }
    fp32 = tensorrt_provider_options(cache, "pixels", (1, 32, 32), 2, "fp32")
    assert (fp32["trt_fp16_enable"], fp32["trt_layer_norm_fp32_fallback"], fp32["trt_bf16_enable"]) == ("False",) * 3
    assert (fp32["trt_profile_min_shapes"], fp32["trt_profile_max_shapes"]) == ("pixels:1x1x32x32", "pixels:2x1x32x32")
    assert tensorrt_provider_options(cache, "input", (3, 224, 224), 8, "bf16")["trt_bf16_enable"] == "True"
    int8 = tensorrt_provider_options(cache, "input", (3, 224, 224), 8, "int8")
    assert (int8["trt_int8_enable"], int8["trt_fp16_enable"]) == ("True", "False")  # no calibration table: Q/DQ
    with pytest.raises(ValueError, match="max_batch_size 0"):
        tensorrt_provider_options(cache, "input", (3, 224, 224), 0, "fp32")


def test_cuda_provider_options_and_the_provider_chains():
    assert cuda_provider_options() == {"device_id": "0", "cudnn_conv_algo_search": "EXHAUSTIVE", "use_tf32": "0"}
    assert cuda_provider_options(device_id=1)["device_id"] == "1"
    trt, cuda = {"trt_fp16_enable": "True"}, {"device_id": "0"}
    assert provider_chain("tensorrt", {"tensorrt": trt, "cuda": cuda}) == [
        ("TensorrtExecutionProvider", trt), ("CUDAExecutionProvider", cuda), "CPUExecutionProvider"]
    assert provider_chain("cuda", {"cuda": cuda}) == [("CUDAExecutionProvider", cuda), "CPUExecutionProvider"]
    assert provider_chain("cpu") == ["CPUExecutionProvider"]


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_the_service_gives_the_tensorrt_provider_its_options_for_the_served_version(private_repository, precision):
    repository = ModelRepository(private_repository)
    version = repository.load("atto")
    if precision == "fp16":  # stands in for an fp16 export: only the options are checked, nothing is loaded
        fp16 = describe_file(version.path, "model.onnx", format="onnx", precision="fp16")
        version = repository.add_artifact("atto", 1, version.path / "model.onnx", fp16.model_copy(
            update={"file": "model.fp16.onnx"}))
    settings = Settings(repository=str(private_repository), provider="tensorrt", precision=precision,
                        max_batch_size=4)
    engine = default_engine(version, settings)
    cache = version.path / "engines" / "ort-trt" / f"ort-{onnxruntime.__version__}"
    assert engine.provider_options == {
        "cuda": cuda_provider_options(),
        "tensorrt": tensorrt_provider_options(cache, "input", (3, 64, 64), 4, precision),
    }
    assert engine.provider_options["tensorrt"]["trt_profile_max_shapes"] == "input:4x3x64x64"
    assert engine.provider_options["tensorrt"]["trt_fp16_enable"] == str(precision == "fp16")
    assert engine.model_path.name == {"fp32": "model.onnx", "fp16": "model.fp16.onnx"}[precision]
    cuda = default_engine(version, Settings(repository=str(private_repository), provider="cuda"))
    assert cuda.provider_options == {"cuda": cuda_provider_options()}


def test_the_provider_setting_offers_exactly_the_provider_table():
    assert set(get_args(Settings.model_fields["provider"].annotation)) == set(PROVIDERS)
