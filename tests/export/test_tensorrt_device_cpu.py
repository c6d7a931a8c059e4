"""select_or_build_engine(device=N) names, builds and verifies the engine on CUDA device N, and a TensorRTRunner for
device N runs and frees on it from any thread, checked without a GPU.

TensorRT and cuda-python's runtime are stand-ins here (a GPU host runs the real ones: tests/gpu/): StandInCudaRuntime
has two GPUs and keeps a current device per thread, as CUDA does; the TensorRT build and the engine's parity run are
recorders of the device current when they run. The target, the engine's name, the lock, the build step
(TensorRTBuild) and the manifest update are the real runtime.tensorrt, tensorrt_build and tensorrt_files code, and the
runner is the real runtime.tensorrt_runtime.TensorRTRunner over a stand-in engine and host memory.
"""
from __future__ import annotations

import ctypes
import threading
from pathlib import Path
from types import SimpleNamespace

import numpy as np
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


class StandInCudaMemory(StandInCudaRuntime):
    """Adds the calls TensorRTRunner makes: host memory stands in for device memory (memmove for the copies), and
    each call records the calling thread's current device."""

    cudaMemcpyKind = SimpleNamespace(cudaMemcpyHostToDevice=1, cudaMemcpyDeviceToHost=2)  # noqa: N815

    def __init__(self):
        super().__init__()
        self.buffers: dict[int, ctypes.Array] = {}
        self.devices_seen: list[tuple[str, int]] = []

    def seen(self, call: str) -> None:
        self.devices_seen.append((call, self.cudaGetDevice()[1]))

    def cudaMalloc(self, nbytes):  # noqa: N802
        self.seen("cudaMalloc")
        buffer = ctypes.create_string_buffer(nbytes)
        self.buffers[ctypes.addressof(buffer)] = buffer
        return CUDA_SUCCESS, ctypes.addressof(buffer)

    cudaMallocHost = cudaMalloc  # noqa: N815

    def cudaStreamCreate(self):  # noqa: N802
        from cuda.bindings import runtime  # installed with torch in the dev install (locks/dev.txt); no GPU needed

        self.seen("cudaStreamCreate")
        return CUDA_SUCCESS, runtime.cudaStream_t(0x5EED)

    def cudaMemcpyAsync(self, dst, src, nbytes, kind, stream):  # noqa: N802
        self.seen("cudaMemcpyAsync")
        ctypes.memmove(dst, src, nbytes)
        return (CUDA_SUCCESS,)

    def _done(self, call: str):
        self.seen(call)
        return (CUDA_SUCCESS,)

    def cudaStreamSynchronize(self, stream):  # noqa: N802
        return self._done("cudaStreamSynchronize")

    def cudaFree(self, pointer):  # noqa: N802
        return self._done("cudaFree")

    def cudaFreeHost(self, pointer):  # noqa: N802
        return self._done("cudaFreeHost")

    def cudaStreamDestroy(self, stream):  # noqa: N802
        return self._done("cudaStreamDestroy")


IMAGE_SHAPE, PROFILE = (3, 4, 4), ((1, 3, 4, 4), (2, 3, 4, 4), (4, 3, 4, 4))


class StandInContext:
    """A TensorRT execution context whose 'network' gives each image's sum and max, read from and written to the
    device buffers; it records the device current in the thread that calls it."""

    def __init__(self, cuda: StandInCudaMemory):
        self.cuda, self.addresses, self.shape = cuda, {}, None

    def set_tensor_address(self, name, pointer):
        self.addresses[name] = pointer
        return True

    def set_input_shape(self, name, shape):
        self.cuda.seen("set_input_shape")
        self.shape = tuple(shape)
        return PROFILE[0][0] <= self.shape[0] <= PROFILE[2][0] and self.shape[1:] == IMAGE_SHAPE

    def execute_async_v3(self, stream_address):
        self.cuda.seen("execute_async_v3")
        count = int(np.prod(self.shape))
        images = np.ctypeslib.as_array((ctypes.c_float * count).from_address(self.addresses["input"]))
        logits = np.ctypeslib.as_array((ctypes.c_float * (2 * self.shape[0])).from_address(self.addresses["logits"]))
        flat = images.reshape(self.shape[0], -1)
        logits[:] = np.stack([flat.sum(1), flat.max(1)], axis=1).ravel()
        return True


class StandInLogger:
    WARNING = 2

    def __init__(self, severity: int):
        self.severity = severity


def stand_in_tensorrt(cuda: StandInCudaMemory) -> SimpleNamespace:
    """The tensorrt module as TensorRTRunner uses it: one engine, input (N, 3, 4, 4) and logits (N, 2), float32."""
    names, modes = ("input", "logits"), SimpleNamespace(INPUT="INPUT", OUTPUT="OUTPUT")
    engine = SimpleNamespace(
        num_io_tensors=2, get_tensor_name=names.__getitem__,
        get_tensor_mode=lambda name: modes.INPUT if name == "input" else modes.OUTPUT,
        get_tensor_profile_shape=lambda name, profile: PROFILE, get_tensor_shape=lambda name: (-1, 2),
        get_tensor_dtype=lambda name: SimpleNamespace(name="FLOAT"),
        create_execution_context=lambda: StandInContext(cuda))
    runtime = SimpleNamespace(deserialize_cuda_engine=lambda data: engine)
    return SimpleNamespace(Logger=StandInLogger, Runtime=lambda logger: runtime, TensorIOMode=modes)


@pytest.fixture()
def runner_on_device_1(monkeypatch, tmp_path):
    cuda = StandInCudaMemory()
    monkeypatch.setattr(tensorrt_runtime, "cudart", lambda: cuda)
    monkeypatch.setattr(tensorrt_runtime, "import_tensorrt", lambda: stand_in_tensorrt(cuda))
    (tmp_path / "model.engine").write_bytes(b"engine")
    runner = tensorrt_runtime.TensorRTRunner(tmp_path / "model.engine", device=1)
    cuda.devices_seen.clear()
    yield runner, cuda
    runner.close()


def in_new_thread(call):
    """call() in a new host thread (its current CUDA device: 0, until it sets one); what it returned."""
    done = []
    worker = threading.Thread(target=lambda: done.append(call()))
    worker.start()
    worker.join(timeout=60)
    assert done, "the call failed in its thread"
    return done[0]


def test_a_runner_runs_on_its_device_when_called_from_another_thread(runner_on_device_1):
    """The service runs engines from its own thread: each run makes the runner's device current there first."""
    runner, cuda = runner_on_device_1
    batch = np.random.default_rng(0).standard_normal((6, *IMAGE_SHAPE)).astype(np.float32)
    logits = in_new_thread(lambda: runner.run(batch))
    flat = batch.reshape(6, -1)
    np.testing.assert_allclose(logits, np.stack([flat.sum(1), flat.max(1)], axis=1), rtol=1e-6)
    calls = [call for call, _ in cuda.devices_seen]
    assert calls.count("execute_async_v3") == 2 and "set_input_shape" in calls  # 6 rows: a call of 4, one of 2
    assert {device for _, device in cuda.devices_seen} == {1}, cuda.devices_seen


def test_a_runner_frees_its_buffers_on_its_device_when_closed_from_another_thread(runner_on_device_1):
    runner, cuda = runner_on_device_1
    in_new_thread(lambda: runner.close() or True)
    assert {call for call, _ in cuda.devices_seen} == {"cudaFree", "cudaFreeHost", "cudaStreamDestroy"}
    assert {device for _, device in cuda.devices_seen} == {1}, cuda.devices_seen


def test_the_parity_run_allocates_for_its_inputs_not_the_profiles_largest_batch(tmp_path, monkeypatch):
    """The runner sized its pinned and device buffers for the profile's largest batch (--max-batch up to 4096: about
    2.4 GiB each for a 224-px input) to check ten images; it is made for the verification inputs."""
    made = []

    def logits(path_or_batch, batch=None):  # the engine and ONNX Runtime fp32 stand in alike: two "logits" per row
        rows = path_or_batch if batch is None else batch
        return rows.reshape(len(rows), -1)[:, :2].astype(np.float32)

    class Runner:  # TensorRTRunner's interface, recording what it was asked to allocate for
        def __init__(self, engine_path, *, max_batch_size=None, device=None):
            made.append(max_batch_size)

        def __enter__(self):
            return self

        def __exit__(self, *exc_info):
            return None

        run = staticmethod(logits)

    monkeypatch.setattr(tensorrt_build, "run_onnxruntime", logits)
    monkeypatch.setattr(tensorrt_build, "TensorRTRunner", Runner)
    parity = tensorrt_build.engine_parity(make_version(tmp_path), tmp_path / "model.engine", "fp16")
    assert made == [parity.num_inputs] and parity.max_abs_diff == 0.0
