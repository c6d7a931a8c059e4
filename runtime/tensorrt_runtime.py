"""The one TensorRT runner: an engine, one CUDA stream, pinned host and device buffers allocated once per engine.

The service's TensorRT engine, export's parity check and the bench all run engines through `TensorRTRunner`, so
what is verified and what is timed is what serves. TensorRT and cuda-python (`cuda.bindings.runtime`) are imported
lazily; the batch arithmetic and the dtype mapping here are pure and run anywhere.
"""
from __future__ import annotations

import ctypes
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np


class TensorRTError(RuntimeError):
    """TensorRT is missing, the build failed, or an engine does not fit this TensorRT / GPU."""


class EngineDeserializeError(TensorRTError):
    """TensorRT could not deserialize an engine file: corrupt, or built by another TensorRT build or GPU."""


@dataclass(frozen=True)
class Chunk:
    """Rows [start, stop) of a batch, run as one engine call of `size` rows (the rows past stop are padding)."""

    start: int
    stop: int
    size: int


def plan_chunks(num_rows: int, min_batch: int, max_batch: int) -> list[Chunk]:
    """Split `num_rows` into engine calls within the profile's [min_batch, max_batch]; pad a short last call."""
    if not 1 <= min_batch <= max_batch:
        raise ValueError(f"batch profile min {min_batch} / max {max_batch} must satisfy 1 <= min <= max")
    if num_rows < 0:
        raise ValueError(f"a batch cannot have {num_rows} rows")
    chunks = []
    for start in range(0, num_rows, max_batch):
        stop = min(start + max_batch, num_rows)
        chunks.append(Chunk(start, stop, max(stop - start, min_batch)))
    return chunks


def run_in_chunks(run_chunk: Callable[[np.ndarray], np.ndarray], batch: np.ndarray, min_batch: int, max_batch: int,
                  output_width: int) -> np.ndarray:
    """run_chunk over `batch` in profile-sized calls; padded rows (zeros) are run and then dropped."""
    outputs = []
    for chunk in plan_chunks(len(batch), min_batch, max_batch):
        rows = batch[chunk.start:chunk.stop]
        if chunk.size > len(rows):
            rows = np.concatenate([rows, np.zeros((chunk.size - len(rows), *rows.shape[1:]), rows.dtype)])
        outputs.append(np.asarray(run_chunk(rows))[:chunk.stop - chunk.start])
    if not outputs:
        return np.zeros((0, output_width), np.float32)
    return np.concatenate(outputs)


def numpy_dtype(tensorrt_dtype_name: str) -> np.dtype:
    """The NumPy dtype of a TensorRT I/O tensor, by its `trt.DataType` name (trt.nptype has no bfloat16)."""
    if tensorrt_dtype_name == "FLOAT":
        return np.dtype(np.float32)
    if tensorrt_dtype_name == "HALF":
        return np.dtype(np.float16)
    if tensorrt_dtype_name == "BF16":
        try:
            import ml_dtypes
        except ImportError as error:
            raise RuntimeError(f"the engine has bfloat16 inputs or outputs and NumPy needs ml_dtypes for them "
                               f"({error}): pip install ml_dtypes, or export with fp32 inputs/outputs") from error
        return np.dtype(ml_dtypes.bfloat16)
    raise RuntimeError(f"engine tensors of type {tensorrt_dtype_name} are not supported: expected FLOAT, HALF or BF16")


def input_shape_error(name: str, shape: tuple[int, ...], profile: tuple[tuple[int, ...], ...]) -> str:
    """Why set_input_shape said no: the shape and the profile (min, opt, max) it must fall in."""
    low, opt, high = (tuple(int(d) for d in s) for s in profile)
    return (f"TensorRT refused input shape {tuple(shape)} for {name!r}: the engine's profile allows {low} to {high} "
            f"(opt {opt}); rebuild the engine with a profile that covers it (python -m export tensorrt --max-batch)")


# How to install the GPU half (one wording everywhere; deploy/ and README say the same).
GPU_INSTALL_HINT = ("in a venv without the CPU onnxruntime, pip install -e '.[serve,gpu]' --extra-index-url "
                    "https://pypi.nvidia.com (tensorrt-cu13 downloads its libraries from there), or use the GPU "
                    "image; python -m service doctor says what is missing")

def import_tensorrt():
    try:
        import tensorrt as trt
    except ImportError as error:
        raise TensorRTError(
            f"TensorRT is not installed ({error}): on a host with an NVIDIA GPU (driver >= 580), {GPU_INSTALL_HINT}; "
            "or serve with ONNX Runtime instead"
        ) from error
    return trt


def weakly_typed(trt) -> bool:
    """Whether this TensorRT builds fp16/bf16 engines from an fp32 graph by builder flags (TensorRT 10), rather than
    only strongly typed from the precision's own graph (TensorRT 11)."""
    return "FP16" in trt.BuilderFlag.__members__


def cudart():
    try:
        from cuda.bindings import runtime
    except ImportError as error:
        raise TensorRTError(
            f"cuda-python is not installed ({error}): it is part of the gpu extra: {GPU_INSTALL_HINT}"
        ) from error
    return runtime


def use_cuda_device(device: int) -> None:
    """Make CUDA device `device` current for the calling thread (cudaSetDevice: per host thread, device 0 until set).

    TensorRT builds and deserializes on the current device, and streams, allocations and launches go to it (trtexec
    --device does the same: cudaSetDevice before anything else). Not restored afterwards: making device 0 current
    again would create a CUDA context on it, which a process meant for another GPU should not hold.
    """
    cuda_call(cudart().cudaSetDevice(device))


def current_cuda_device() -> int:
    """The calling thread's current CUDA device (cudaGetDevice)."""
    return int(cuda_call(cudart().cudaGetDevice()))


def stream_handle(stream) -> int:
    """The address behind a cuda-python stream, as execute_async_v3 takes it: cuda-bindings 13 deprecates int() on its
    objects for `cuda.bindings.utils.get_cuda_native_handle` (its 13.0.0 release notes); int() where that is absent."""
    try:
        from cuda.bindings.utils import get_cuda_native_handle
    except ImportError:
        return int(stream)
    return int(get_cuda_native_handle(stream))


def cuda_call(result):
    """cuda-python returns (error, *values): raise on error, return the value(s)."""
    error, *values = result
    if int(error) != 0:
        raise RuntimeError(f"CUDA call failed: {error}")
    return values[0] if len(values) == 1 else tuple(values) or None


class TensorRTRunner:
    """Deserialize an engine once, allocate its buffers once; run(batch) -> float32 logits of any number of rows.

    Each engine call copies the rows into pinned host memory, then host->device, execute and device->host on one
    stream, and waits for that stream: the service calls it from one engine thread, so one stream is enough.
    Everything runs on `device` (default: the current device when the runner is made), made current again for each
    run and for close, as they may come from another thread than the one that made the runner.
    """

    def __init__(self, engine_path: str | Path, *, max_batch_size: int | None = None,
                 input_shape: tuple[int, ...] | None = None, device: int | None = None):
        trt = import_tensorrt()
        self.engine_path = Path(engine_path)
        self._rt = cudart()
        self.cuda_device = current_cuda_device() if device is None else device
        use_cuda_device(self.cuda_device)  # before the runtime: the engine's memory goes to the current device
        self._device: list[int] = []
        self._host: list[int] = []
        self.stream: Any = None  # a cudaStream_t once set up (cuda-python is imported lazily)
        self.stream_address = 0  # its address for execute_async_v3, set with it
        self.runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engine = self.runtime.deserialize_cuda_engine(self.engine_path.read_bytes())
        if self.engine is None:
            raise EngineDeserializeError(f"TensorRT could not deserialize {self.engine_path} (corrupt, or built by "
                                         f"another TensorRT build or GPU; TensorRT's log above says which)")
        try:
            self._setup(trt, max_batch_size, input_shape)
        except BaseException:
            self.close()
            raise

    def _setup(self, trt, max_batch_size: int | None, input_shape: tuple[int, ...] | None) -> None:
        engine = self.engine
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        outputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        if len(inputs) != 1 or len(outputs) != 1:
            raise RuntimeError(f"{self.engine_path} has inputs {inputs} and outputs {outputs}; expected one of each")
        self.input_name, self.output_name = inputs[0], outputs[0]
        self.profile = tuple(tuple(int(d) for d in s) for s in engine.get_tensor_profile_shape(self.input_name, 0))
        self.input_shape = self.profile[2][1:]  # (C, H, W): only the batch axis is dynamic
        if input_shape is not None and tuple(input_shape) != self.input_shape:
            raise RuntimeError(f"{self.engine_path} takes images of shape {self.input_shape}, not {tuple(input_shape)}")
        self.min_batch, self.max_batch = self.profile[0][0], self.profile[2][0]
        if max_batch_size is not None:
            self.max_batch = max(self.min_batch, min(self.max_batch, int(max_batch_size)))
        output_shape = tuple(int(d) for d in engine.get_tensor_shape(self.output_name))  # (-1, num_classes)
        if len(output_shape) != 2 or output_shape[1] < 1:
            raise RuntimeError(f"{self.engine_path} outputs shape {output_shape}; expected (batch, num_classes)")
        self.num_classes = output_shape[1]
        self.input_dtype = numpy_dtype(engine.get_tensor_dtype(self.input_name).name)
        self.output_dtype = numpy_dtype(engine.get_tensor_dtype(self.output_name).name)
        self.context = engine.create_execution_context()
        self.stream = cuda_call(self._rt.cudaStreamCreate())
        self.stream_address = stream_handle(self.stream)  # what execute_async_v3 takes, once: the stream stays
        self.host_input, self.device_input = self._allocate((self.max_batch, *self.input_shape), self.input_dtype)
        self.host_output, self.device_output = self._allocate((self.max_batch, self.num_classes), self.output_dtype)
        for name, pointer in ((self.input_name, self.device_input), (self.output_name, self.device_output)):
            if not self.context.set_tensor_address(name, pointer):
                raise RuntimeError(f"TensorRT refused the device buffer for {name!r} of {self.engine_path}")

    def _allocate(self, shape: tuple[int, ...], dtype: np.dtype) -> tuple[np.ndarray, int]:
        """A pinned host array (a NumPy view over cudaMallocHost memory) and a device buffer of the same size."""
        nbytes = int(np.prod(shape)) * dtype.itemsize
        host_pointer = int(cuda_call(self._rt.cudaMallocHost(nbytes)))  # pinned, so the copies are truly async
        self._host.append(host_pointer)
        device_pointer = int(cuda_call(self._rt.cudaMalloc(nbytes)))
        self._device.append(device_pointer)
        raw = np.ctypeslib.as_array((ctypes.c_byte * nbytes).from_address(host_pointer))
        return raw.view(dtype).reshape(shape), device_pointer

    def run(self, batch: np.ndarray) -> np.ndarray:
        """float32 (N, num_classes) logits for N images, in engine calls within [min_batch, max_batch]."""
        if self.stream is None:
            raise RuntimeError(f"the TensorRT runner for {self.engine_path} is closed")
        if tuple(batch.shape[1:]) != self.input_shape:
            raise ValueError(f"batch of shape {tuple(batch.shape)}; the engine takes (N, *{self.input_shape})")
        use_cuda_device(self.cuda_device)  # this thread's current device may be another (the stream is on this one)
        return run_in_chunks(self._run_chunk, batch, self.min_batch, self.max_batch, self.num_classes)

    def _run_chunk(self, batch: np.ndarray) -> np.ndarray:
        rt, n = self._rt, len(batch)
        shape = (n, *self.input_shape)
        if not self.context.set_input_shape(self.input_name, shape):
            raise RuntimeError(input_shape_error(self.input_name, shape, self.profile))
        self.host_input[:n] = batch  # casts to the engine's input dtype
        in_bytes = self.host_input[:n].nbytes
        out_bytes = self.host_output[:n].nbytes
        # cudaMemcpyAsync(dst, src, count, kind, stream)
        cuda_call(rt.cudaMemcpyAsync(self.device_input, self.host_input.ctypes.data, in_bytes,
                                     rt.cudaMemcpyKind.cudaMemcpyHostToDevice, self.stream))
        if not self.context.execute_async_v3(self.stream_address):
            raise RuntimeError(f"TensorRT execute_async_v3 failed for a batch of {n} ({self.engine_path})")
        cuda_call(rt.cudaMemcpyAsync(self.host_output.ctypes.data, self.device_output, out_bytes,
                                     rt.cudaMemcpyKind.cudaMemcpyDeviceToHost, self.stream))
        cuda_call(rt.cudaStreamSynchronize(self.stream))
        return self.host_output[:n].astype(np.float32)  # a copy: the pinned buffer is reused by the next call

    def close(self) -> None:
        """Free the buffers and the stream; safe to call twice."""
        rt = self._rt
        if self._device or self._host or self.stream is not None:
            rt.cudaSetDevice(self.cuda_device)  # errors ignored, as the frees' are: close also runs after GPU faults
        for pointer in self._device:
            rt.cudaFree(pointer)
        for pointer in self._host:
            rt.cudaFreeHost(pointer)
        self._device, self._host = [], []
        if self.stream is not None:
            rt.cudaStreamDestroy(self.stream)
            self.stream = None
        self.context = None
        self.engine = None

    def __enter__(self) -> TensorRTRunner:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
