"""ONNX Runtime engine: CPU, CUDA or TensorRT execution provider, threads tuned for throughput."""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from runtime.engines.base import EngineError, ModelFileEngine
from runtime.ort_session import PROVIDERS, ProviderError, create_session


def check_onnxruntime_options(provider: str, precision: str, streams: int) -> None:
    """EngineError for options no ONNX Runtime session takes: an unknown provider; streams other than 1 off the CPU
    provider; bf16 on the CPU provider, whose kernels have no bfloat16 Conv (the session fails to load with
    NOT_IMPLEMENTED Conv(22)); the CUDA provider registers one (Conv 22+, its OperatorKernels.md), so it may try."""
    if provider not in PROVIDERS:
        raise EngineError(f"unknown provider {provider!r}; choose one of {sorted(PROVIDERS)}")
    if streams < 1 or (streams > 1 and provider != "cpu"):
        raise EngineError(f"ONNX Runtime streams must be 1, or more on the CPU provider only (got {streams} on "
                          f"{provider})")
    if provider == "cpu" and precision == "bf16":
        raise EngineError("ONNX Runtime's CPU provider has no bfloat16 Conv kernel: serve bf16 with --engine openvino "
                          "--precision bf16 (a CPU with native BF16) or, on a GPU, --engine tensorrt --precision bf16")


class OnnxRuntimeEngine(ModelFileEngine):
    name = "onnxruntime"

    def __init__(self, model_path: Path, input_shape: tuple[int, int, int], *, input_name: str = "input",
                 provider: str = "cpu", precision: str = "fp32", max_batch_size: int = 8, intra_op_threads: int = 1,
                 spinning: bool = True, provider_options: Mapping[str, Mapping[str, str]] | None = None,
                 streams: int = 1):
        check_onnxruntime_options(provider, precision, streams)
        super().__init__(model_path, input_shape, input_name=input_name, precision=precision,
                         max_batch_size=max_batch_size)
        self.provider = provider
        self.intra_op_threads = intra_op_threads
        self.spinning = spinning
        self.provider_options = provider_options  # short provider name -> its options (runtime/ort_session.py)
        # streams > 1: that many batches run at once on the one session (Run is thread-safe), each on
        # intra_op_threads threads; on a few cores this overlaps image decoding with inference under load.
        self.max_concurrent_batches = streams
        self.session: Any = None  # an ort.InferenceSession once loaded (onnxruntime is imported lazily)
        self.input_dtype: type[np.floating] = np.float32

    def load(self) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = self.intra_op_threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.add_session_config_entry("session.intra_op.allow_spinning", "1" if self.spinning else "0")
        try:
            self.session = create_session(self.model_path, self.provider, options, self.provider_options)
        except ProviderError as err:
            raise EngineError(str(err)) from err
        inputs = self.session.get_inputs()
        self.input_name = inputs[0].name
        # fp16 artifacts take float16 input; the service always hands float32 in and casts here.
        self.input_dtype = np.float16 if inputs[0].type == "tensor(float16)" else np.float32

    def run(self, batch: np.ndarray) -> np.ndarray:
        if self.session is None:
            raise EngineError("the engine is not loaded; call load() first")
        (logits,) = self.session.run(None, {self.input_name: batch.astype(self.input_dtype, copy=False)})
        return np.asarray(logits, dtype=np.float32)

    def close(self) -> None:
        self.session = None
