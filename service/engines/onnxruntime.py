"""ONNX Runtime engine: CPU, CUDA or TensorRT execution provider, threads tuned for throughput."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from service.engines.base import Engine, EngineDescription, EngineError

PROVIDERS = {
    "cpu": ["CPUExecutionProvider"],
    "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"],
    "tensorrt": ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"],
}


class OnnxRuntimeEngine(Engine):
    def __init__(self, model_path: Path, input_shape: tuple[int, int, int], *, input_name: str = "input",
                 provider: str = "cpu", precision: str = "fp32", max_batch_size: int = 8, intra_op_threads: int = 1,
                 spinning: bool = True):
        if provider not in PROVIDERS:
            raise EngineError(f"unknown provider {provider!r}; choose one of {sorted(PROVIDERS)}")
        self.model_path = Path(model_path)
        self.input_shape = tuple(input_shape)
        self.input_name = input_name
        self.provider = provider
        self.precision = precision
        self.max_batch_size = max_batch_size
        self.intra_op_threads = intra_op_threads
        self.spinning = spinning
        self.session = None
        self.input_dtype = np.float32

    def load(self) -> None:
        import onnxruntime as ort

        available = ort.get_available_providers()
        wanted = PROVIDERS[self.provider]
        if wanted[0] not in available:
            raise EngineError(f"{wanted[0]} is not available in this onnxruntime build (have {available}); "
                              "install onnxruntime-gpu or use --provider cpu")
        options = ort.SessionOptions()
        options.intra_op_num_threads = self.intra_op_threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.add_session_config_entry("session.intra_op.allow_spinning", "1" if self.spinning else "0")
        try:
            self.session = ort.InferenceSession(str(self.model_path), sess_options=options, providers=wanted)
        except Exception as err:  # onnxruntime raises its own exception types for bad files
            raise EngineError(f"ONNX Runtime could not load {self.model_path}: {err}") from err
        inputs = self.session.get_inputs()
        self.input_name = inputs[0].name
        # fp16 artifacts take float16 input; the service always hands float32 in and casts here.
        self.input_dtype = np.float16 if inputs[0].type == "tensor(float16)" else np.float32

    def run(self, batch: np.ndarray) -> np.ndarray:
        if self.session is None:
            raise EngineError("the engine is not loaded; call load() first")
        (logits,) = self.session.run(None, {self.input_name: batch.astype(self.input_dtype, copy=False)})
        return np.asarray(logits, dtype=np.float32)

    def describe(self) -> EngineDescription:
        return EngineDescription("onnxruntime", self.input_name, self.input_shape, self.max_batch_size,
                                 self.precision, self.provider)

    def close(self) -> None:
        self.session = None
