"""select_or_build_engine(device=N) names, builds and verifies the engine on CUDA device N, checked without a GPU.

TensorRT and cuda-python's runtime are stand-ins here (a GPU host runs the real ones: tests/gpu/): StandInCudaRuntime
has two GPUs and keeps a current device per thread, as CUDA does; the TensorRT build and the engine's parity run are
recorders of the device current when they run. The target, the engine's name, the lock, the build step
(TensorRTBuild) and the manifest update are the real runtime.tensorrt, tensorrt_build and tensorrt_files code.
"""
from __future__ import annotations

import threading
from pathlib import Path
from types import SimpleNamespace

import pytest

import runtime.tensorrt_build as tensorrt_build
import runtime.tensorrt_runtime as tensorrt_runtime
from export.__main__ import main
from runtime.repository import Parity
from runtime.tensorrt import BatchProfile, select_or_build_engine
from tests.export.engine_build_worker import make_version

CUDA_SUCCESS, CUDA_ERROR_INVALID_DEVICE = 0, 101


class StandInCudaRuntime:
    """The cuda.bindings.runtime calls the build path makes, answering (error, *values) as cuda-python does."""

    gpus = (("NVIDIA A10", 8, 6), ("NVIDIA H200", 9, 0))  # device 0, device 1

    def __init__(self):
        self.thread = threading.local()  # cudaSetDevice sets the calling host thread's device

    def cudaGetDevice(self):  # noqa: N802 (CUDA's names)
        return CUDA_SUCCESS, getattr(self.thread, "device", 0)

    def cudaSetDevice(self, device):  # noqa: N802
        if not 0 <= device < len(self.gpus):
            return (CUDA_ERROR_INVALID_DEVICE,)
        self.thread.device = device
        return (CUDA_SUCCESS,)

    def cudaGetDeviceProperties(self, device):  # noqa: N802
        name, major, minor = self.gpus[device]
        return CUDA_SUCCESS, SimpleNamespace(name=name.encode(), major=major, minor=minor)


@pytest.fixture()
def gpus(monkeypatch):
    """Two stand-in GPUs, TensorRT 10 (weakly typed), and recorders in place of the TensorRT build and run."""
    cuda = StandInCudaRuntime()
    ran_on: dict[str, int] = {}

    def build_engine(onnx_path, engine_path: Path, precision, profile, **options):
        ran_on["build"] = cuda.cudaGetDevice()[1]
        engine_path.write_bytes(b"engine")

    def engine_parity(version, engine_path, precision, device=None):  # the runner: `device`, else the current one
        ran_on["parity"] = device if device is not None else cuda.cudaGetDevice()[1]
        return Parity(reference="onnxruntime-fp32", num_inputs=1, num_real_images=0, max_abs_diff=0.0,
                      top1_agreement=1.0, top5_agreement=1.0)

    trt = SimpleNamespace(__version__="10.13.2.6", BuilderFlag=SimpleNamespace(__members__={"FP16": 0, "TF32": 1}))
    monkeypatch.setattr(tensorrt_runtime, "cudart", lambda: cuda)
    monkeypatch.setattr(tensorrt_build, "cudart", lambda: cuda)
    monkeypatch.setattr(tensorrt_build, "import_tensorrt", lambda: trt)
    monkeypatch.setattr(tensorrt_build, "build_engine", build_engine)
    monkeypatch.setattr(tensorrt_build, "engine_parity", engine_parity)
    return ran_on


@pytest.mark.parametrize("device, name, tag", [(1, "NVIDIA H200", "sm90-h200"), (0, "NVIDIA A10", "sm86-a10")])
def test_an_engine_for_device_n_is_built_and_verified_with_device_n_current(gpus, tmp_path, device, name, tag):
    version = make_version(tmp_path)
    artifact, updated = select_or_build_engine(version, "fp16", BatchProfile(1, 4, 8), device=device)
    assert (artifact.tensorrt.device_name, f".{tag}." in artifact.file) == (name, True)  # named from device N
    assert gpus == {"build": device, "parity": device}  # and built and run on it
    assert updated.manifest.find("onnx", "fp32") is not None and artifact in updated.manifest.artifacts


def test_a_build_on_another_thread_still_runs_on_the_targets_device(gpus, tmp_path):
    """cudaSetDevice is per host thread: the build step makes its device current in the thread it runs in."""
    version = make_version(tmp_path)
    done = []
    worker = threading.Thread(target=lambda: done.append(select_or_build_engine(version, "fp16", BatchProfile(),
                                                                              device=1)))
    worker.start()
    worker.join(timeout=60)
    assert done and gpus["build"] == gpus["parity"] == 1
    assert tensorrt_runtime.cudart().cudaGetDevice()[1] == 0  # this thread's current device is its own


def test_export_tensorrt_device_picks_the_gpu(gpus, tmp_path, capsys):
    make_version(tmp_path)
    code = main(["tensorrt", "--name", "tiny", "--repository", str(tmp_path), "--device", "1", "--max-batch", "8",
                 "--quiet"])
    assert code == 0, capsys.readouterr().err
    assert ".sm90-h200.b1-8-8.engine" in capsys.readouterr().out and gpus == {"build": 1, "parity": 1}


def test_the_default_timing_cache_is_the_targets_device_models(gpus, tmp_path, monkeypatch):
    caches = []

    def build_engine(onnx_path, engine_path: Path, precision, profile, *, timing_cache, **options):
        caches.append(timing_cache)
        engine_path.write_bytes(b"engine")

    monkeypatch.setattr(tensorrt_build, "build_engine", build_engine)
    version = make_version(tmp_path)
    for device in (1, 0):
        select_or_build_engine(version, "fp16", BatchProfile(), device=device)
    assert [cache.relative_to(tmp_path) for cache in caches] == [Path(".timing_cache.trt10.13.2.6.sm90-h200"),
                                                                 Path(".timing_cache.trt10.13.2.6.sm86-a10")]
