"""OpenVINO CPU engine on the repository's ONNX files: fp32 (f32 forced), bf16 (where the CPU has it), int8 (QDQ)."""
from __future__ import annotations

import queue
from pathlib import Path
from typing import Any

import numpy as np

from runtime.engines.base import EngineError, ModelFileEngine
from runtime.signal_stack import signal_stack_kept

# precision -> (the ONNX artifact's precision it reads, OpenVINO's inference precision). bf16 reads the fp32 graph and
# lets the CPU plugin run it in bf16; int8 reads the QDQ graph, whose unquantized ops stay f32.
PRECISIONS = {"fp32": ("fp32", "f32"), "bf16": ("fp32", "bf16"), "int8": ("int8", "f32")}
PERFORMANCE_HINTS = ("LATENCY", "THROUGHPUT")


def artifact_precision(precision: str) -> str:
    """The precision of the repository's ONNX artifact this engine reads for `precision`."""
    if precision not in PRECISIONS:
        raise EngineError(f"the OpenVINO engine runs precision {'/'.join(PRECISIONS)}, not {precision!r}; "
                          "pass --precision fp32 (or bf16 where the CPU has it, int8 from a QDQ artifact)")
    return PRECISIONS[precision][0]


def check_openvino_options(provider: str, ort_streams: int) -> None:
    """EngineError for ONNX Runtime's options given to OpenVINO, refused rather than ignored: a GPU provider would
    otherwise be a quiet CPU run, and OpenVINO's way to run batches at once is its performance hint."""
    if provider != "cpu":
        raise EngineError(f"the OpenVINO engine runs on the CPU, not provider {provider!r}: pass --provider cpu "
                          "(CONVNEXT_PROVIDER=cpu), or on a GPU --engine tensorrt or onnxruntime --provider cuda")
    if ort_streams != 1:
        raise EngineError(f"--ort-streams {ort_streams} is ONNX Runtime's: OpenVINO runs batches at once under "
                          "--openvino-performance-hint THROUGHPUT; pass that, with --ort-streams 1")


def cpu_supports_bf16(core) -> bool:
    """True where OpenVINO's CPU plugin computes in bf16 natively (AVX512_BF16 or AMX), not emulated."""
    return "BF16" in core.get_property("CPU", "OPTIMIZATION_CAPABILITIES")


class OpenVinoEngine(ModelFileEngine):
    name = "openvino"
    provider = "cpu"

    def __init__(self, model_path: Path, input_shape: tuple[int, int, int], *, input_name: str = "input",
                 precision: str = "fp32", max_batch_size: int = 8, threads: int = 1,
                 performance_hint: str = "LATENCY"):
        artifact_precision(precision)
        if performance_hint not in PERFORMANCE_HINTS:
            raise EngineError(f"unknown OpenVINO performance hint {performance_hint!r}; "
                              f"choose one of {PERFORMANCE_HINTS}")
        super().__init__(model_path, input_shape, input_name=input_name, precision=precision,
                         max_batch_size=max_batch_size)
        self.threads = threads
        self.performance_hint = performance_hint
        self.compiled: Any = None  # an ov.CompiledModel once loaded (openvino is imported lazily)
        self.idle_requests: queue.SimpleQueue | None = None  # one infer request per batch in flight

    def load(self) -> None:
        """Compile the model for the CPU and create its infer requests; a second call keeps the loaded model."""
        if self.compiled is not None:
            return
        import openvino as ov
        import openvino.properties as props
        import openvino.properties.hint as hints

        core = ov.Core()
        if self.precision == "bf16" and not cpu_supports_bf16(core):
            raise EngineError(f"this CPU ({core.get_property('CPU', props.device.full_name)}) has no native bf16 "
                              "(no AVX512_BF16 or AMX in OpenVINO's OPTIMIZATION_CAPABILITIES); use --precision fp32")
        try:
            model = core.read_model(self.model_path)
            # A bounded batch dimension: the plugin plans its memory for at most max_batch_size images.
            model.reshape({model.inputs[0]: ov.PartialShape([ov.Dimension(1, self.max_batch_size),
                                                              *self.input_shape])})
            config = {
                hints.inference_precision: ov.Type.bf16 if PRECISIONS[self.precision][1] == "bf16" else ov.Type.f32,
                hints.performance_mode: getattr(hints.PerformanceMode, self.performance_hint),
                props.inference_num_threads: self.threads,
            }
            with signal_stack_kept():  # the CPU plugin's sigaltstack (runtime/signal_stack.py)
                self.compiled = core.compile_model(model, "CPU", config)
        except RuntimeError as err:  # OpenVINO raises RuntimeError subclasses for unreadable or unsupported models
            raise EngineError(f"OpenVINO could not load {self.model_path}: {err}") from err
        self.input_name = self.compiled.inputs[0].get_any_name()
        # LATENCY: one stream runs each batch on every thread, so one batch at a time. THROUGHPUT: a stream per few
        # cores, each busy only with a batch of its own: OpenVINO says how many requests keep them all busy.
        if self.performance_hint == "THROUGHPUT":
            optimal = self.compiled.get_property(props.optimal_number_of_infer_requests)
            self.max_concurrent_batches = max(1, int(optimal))
        self.idle_requests = queue.SimpleQueue()
        for _ in range(self.max_concurrent_batches):
            self.idle_requests.put(self.compiled.create_infer_request())

    def warmup(self, runs: int = 2) -> None:
        """As every engine, on each infer request (run() takes them in turn)."""
        super().warmup(runs * self.max_concurrent_batches)

    def run(self, batch: np.ndarray) -> np.ndarray:
        """One batch on an idle infer request; up to max_concurrent_batches calls may run at once, from any threads."""
        idle = self.idle_requests
        if idle is None:
            raise EngineError("the engine is not loaded; call load() first")
        if len(batch) > self.max_batch_size:  # the compiled shape is bounded; say so instead of OpenVINO's shape check
            raise EngineError(f"a batch of {len(batch)} is over this engine's max_batch_size {self.max_batch_size}")
        request = idle.get()  # never waits while callers keep to max_concurrent_batches
        try:
            # share_inputs: the request reads the batch in place instead of copying it, and is done with it once
            # infer() returns (synchronous; the GIL is released meanwhile, so other requests run alongside).
            # share_outputs: no copy of the results here, as the one copy below is what is handed out.
            request.infer({0: np.ascontiguousarray(batch, dtype=np.float32)}, share_inputs=True, share_outputs=True)
            return np.array(request.get_output_tensor(0).data, dtype=np.float32)  # a copy: the request reuses it
        finally:
            idle.put(request)

    def close(self) -> None:
        with signal_stack_kept():  # releasing the model puts back a signal stack (runtime/signal_stack.py)
            self.idle_requests = None
            self.compiled = None
