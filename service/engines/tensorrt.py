"""Native TensorRT 10 engine: lazy tensorrt + cuda-python imports, one CUDA stream, pinned host buffers."""
from __future__ import annotations

import ctypes
from pathlib import Path

import numpy as np

from service.engines.base import Engine, EngineDescription, EngineError


def _import_tensorrt():
    try:
        import tensorrt as trt
        from cuda.bindings import runtime as cudart
    except ImportError as err:
        raise EngineError(
            f"the tensorrt engine needs TensorRT and cuda-python on an NVIDIA GPU host ({err}); "
            "install the gpu extra (pip install '.[gpu]') or use --engine onnxruntime"
        ) from None
    return trt, cudart


def _check(result):
    """cuda-python returns (error, *values); raise on any error, return the values."""
    error, *values = result if isinstance(result, tuple) else (result,)
    if int(error) != 0:
        raise EngineError(f"CUDA call failed: {error}")
    return values[0] if len(values) == 1 else values


class TensorRTEngine(Engine):
    def __init__(self, engine_path: Path, input_shape: tuple[int, int, int], *, precision: str = "fp16",
                 max_batch_size: int = 16, input_name: str = "input", output_name: str = "logits"):
        self.engine_path = Path(engine_path)
        self.input_shape = tuple(input_shape)
        self.precision = precision
        self.max_batch_size = max_batch_size
        self.input_name = input_name
        self.output_name = output_name
        self._trt = self._cudart = None
        self.engine = self.context = self.stream = None
        self._device: dict[str, int] = {}
        self._host: dict[str, np.ndarray] = {}
        self._host_ptrs: list[int] = []

    def load(self) -> None:
        trt, cudart = _import_tensorrt()
        self._trt, self._cudart = trt, cudart
        runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engine = runtime.deserialize_cuda_engine(self.engine_path.read_bytes())
        if self.engine is None:
            raise EngineError(f"TensorRT could not deserialize {self.engine_path}; rebuild it for this GPU/version")
        self.context = self.engine.create_execution_context()
        _, _, max_shape = self.engine.get_tensor_profile_shape(self.input_name, 0)
        self.max_batch_size = min(self.max_batch_size, int(max_shape[0]))
        self.stream = _check(cudart.cudaStreamCreate())
        num_classes = int(self.engine.get_tensor_shape(self.output_name)[-1])
        for name, shape in ((self.input_name, (self.max_batch_size, *self.input_shape)),
                            (self.output_name, (self.max_batch_size, num_classes))):
            dtype = np.dtype(trt.nptype(self.engine.get_tensor_dtype(name)))
            nbytes = int(np.prod(shape)) * dtype.itemsize
            host_ptr = _check(cudart.cudaMallocHost(nbytes))  # pinned, so copies are truly async
            self._host_ptrs.append(host_ptr)
            buffer = np.ctypeslib.as_array((ctypes.c_byte * nbytes).from_address(host_ptr))
            self._host[name] = buffer.view(dtype).reshape(shape)
            self._device[name] = _check(cudart.cudaMalloc(nbytes))
            self.context.set_tensor_address(name, self._device[name])

    def run(self, batch: np.ndarray) -> np.ndarray:
        if self.context is None:
            raise EngineError("the engine is not loaded; call load() first")
        cudart = self._cudart
        n = batch.shape[0]
        if n > self.max_batch_size:
            raise EngineError(f"batch of {n} is over the engine profile's max batch {self.max_batch_size}")
        host_in, host_out = self._host[self.input_name], self._host[self.output_name]
        host_in[:n] = batch  # casts to the engine's input dtype
        self.context.set_input_shape(self.input_name, (n, *self.input_shape))
        kind_h2d = cudart.cudaMemcpyKind.cudaMemcpyHostToDevice
        kind_d2h = cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        _check(cudart.cudaMemcpyAsync(self._device[self.input_name], host_in.ctypes.data, host_in[:n].nbytes,
                                      kind_h2d, self.stream))
        if not self.context.execute_async_v3(int(self.stream)):
            raise EngineError("TensorRT execute_async_v3 failed")
        _check(cudart.cudaMemcpyAsync(host_out.ctypes.data, self._device[self.output_name], host_out[:n].nbytes,
                                      kind_d2h, self.stream))
        _check(cudart.cudaStreamSynchronize(self.stream))
        return host_out[:n].astype(np.float32)

    def describe(self) -> EngineDescription:
        return EngineDescription("tensorrt", self.input_name, self.input_shape, self.max_batch_size,
                                 self.precision, "tensorrt")

    def close(self) -> None:
        if self._cudart is None:
            return
        for pointer in self._device.values():
            self._cudart.cudaFree(pointer)
        for pointer in self._host_ptrs:
            self._cudart.cudaFreeHost(pointer)
        if self.stream is not None:
            self._cudart.cudaStreamDestroy(self.stream)
        self._device, self._host, self._host_ptrs = {}, {}, []
        self.context = self.engine = self.stream = None
