"""Run a serialized TensorRT engine on NumPy batches with cuda-python device memory (for parity checks)."""
from __future__ import annotations

from pathlib import Path

import numpy as np


def cudart():
    try:
        from cuda.bindings import runtime
    except ImportError as error:
        raise RuntimeError(
            f"cuda-python is not installed ({error}): install the gpu extra (pip install -e '.[gpu]')"
        ) from error
    return runtime


def cuda_call(result):
    """cuda-python returns (error, *values): raise on error, return the value(s)."""
    error, *values = result
    if int(error) != 0:
        raise RuntimeError(f"CUDA call failed: {error}")
    return values[0] if len(values) == 1 else tuple(values) or None


class EngineRunner:
    """Deserialize an engine once; run(batch) copies in, executes on a stream, copies the logits out."""

    def __init__(self, engine_path: Path):
        from .tensorrt import import_tensorrt

        trt = import_tensorrt()
        self.trt = trt
        self.runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engine = self.runtime.deserialize_cuda_engine(Path(engine_path).read_bytes())
        if self.engine is None:
            raise RuntimeError(f"TensorRT could not deserialize {engine_path} (built by another version or GPU?)")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.input_name = next(n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT)
        self.output_name = next(n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT)
        self.stream = cuda_call(cudart().cudaStreamCreate())

    def run(self, batch: np.ndarray) -> np.ndarray:
        rt = cudart()
        batch = np.ascontiguousarray(batch, dtype=np.float32)
        self.context.set_input_shape(self.input_name, tuple(batch.shape))
        out_shape = tuple(self.context.get_tensor_shape(self.output_name))
        out_dtype = np.dtype(self.trt.nptype(self.engine.get_tensor_dtype(self.output_name)))
        output = np.empty(out_shape, dtype=out_dtype)
        d_in = cuda_call(rt.cudaMalloc(batch.nbytes))
        d_out = cuda_call(rt.cudaMalloc(output.nbytes))
        try:
            cuda_call(rt.cudaMemcpy(d_in, batch.ctypes.data, batch.nbytes, rt.cudaMemcpyKind.cudaMemcpyHostToDevice))
            self.context.set_tensor_address(self.input_name, int(d_in))
            self.context.set_tensor_address(self.output_name, int(d_out))
            if not self.context.execute_async_v3(int(self.stream)):
                raise RuntimeError("TensorRT execute_async_v3 failed")
            cuda_call(rt.cudaStreamSynchronize(self.stream))
            cuda_call(rt.cudaMemcpy(output.ctypes.data, d_out, output.nbytes, rt.cudaMemcpyKind.cudaMemcpyDeviceToHost))
        finally:
            rt.cudaFree(d_in)
            rt.cudaFree(d_out)
        return output.astype(np.float32)

    def close(self) -> None:
        if self.stream is not None:
            cudart().cudaStreamDestroy(self.stream)
            self.stream = None

    def __enter__(self) -> "EngineRunner":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
