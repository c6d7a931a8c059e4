"""`python -m bench all` configurations as data: the smoke and full presets, and what a GPU host changes in them."""
from __future__ import annotations

from dataclasses import dataclass, field, replace


@dataclass(frozen=True)
class ServedEngine:
    """The engine our service runs during the load runs (`python -m service --engine --provider --precision`)."""

    engine: str
    provider: str
    precision: str

    @property
    def label(self) -> str:
        """As the report names it: "ONNX Runtime CPU fp32", "TensorRT fp16"."""
        if self.engine == "tensorrt":
            return f"TensorRT {self.precision}"
        return f"ONNX Runtime {self.provider.upper()} {self.precision}"


CPU_SERVICE = ServedEngine("onnxruntime", "cpu", "fp32")
GPU_SERVICE = ServedEngine("tensorrt", "cuda", "fp16")
# The LitServe peer runs ONNX Runtime only (bench/peer_litserve.py): on a GPU host its CUDA provider, not TensorRT.
GPU_PEER = ServedEngine("onnxruntime", "cuda", "fp16")


@dataclass(frozen=True)
class Preset:
    """What one `bench all` run measures: engines alone, then HTTP load on our service and the LitServe peer."""

    name: str
    variants: tuple[tuple[str, str], ...]  # (model, activation); the first one is served
    precisions: tuple[str, ...]  # ONNX artifacts exported and timed
    batch_sizes: tuple[int, ...]  # engine sweep
    iterations: int  # engine calls per batch size ...
    max_seconds: float  # ... or this long, whichever ends first
    concurrency: tuple[int, ...]  # closed-loop clients, one run each
    rate: float | None  # open-loop arrivals/s; None: half the served engine's images/s at the max batch size
    requests: int  # per load run, at most ...
    seconds: float  # ... and at most this long
    lone_requests: int  # sequential requests per JPEG size for the lone-request breakdown
    peer: bool = True  # also load the LitServe peer
    tensorrt_precisions: tuple[str, ...] = ()  # native TensorRT engines (GPU hosts)
    service: ServedEngine = field(default=CPU_SERVICE)
    peer_engine: ServedEngine = field(default=CPU_SERVICE)
    max_batch_size: int = 8  # our service's and the peer's batch limit; the engine sweep times it too

    def __post_init__(self):
        if not self.variants or not self.precisions or not self.batch_sizes or not self.concurrency:
            raise ValueError(f"preset {self.name!r}: variants, precisions, batch sizes and concurrency must not "
                             "be empty")
        if self.max_batch_size not in self.batch_sizes:  # the service efficiency's denominator
            raise ValueError(f"preset {self.name!r}: batch sizes {self.batch_sizes} must include the service's max "
                             f"batch size {self.max_batch_size}: its efficiency divides by the engine alone at it")
        if min(self.batch_sizes) < 1 or min(self.concurrency) < 1:
            raise ValueError(f"preset {self.name!r}: batch sizes and concurrency levels must be >= 1")
        if self.rate is not None and self.rate <= 0:
            raise ValueError(f"preset {self.name!r}: rate must be > 0, or None to derive it from the engine; "
                             f"got {self.rate}")
        if min(self.iterations, self.requests, self.lone_requests) < 1 or min(self.max_seconds, self.seconds) <= 0:
            raise ValueError(f"preset {self.name!r}: iterations, requests, lone requests and durations must be > 0")

    def on_gpu(self) -> Preset:
        """This preset on a GPU host (`bench all --gpu`), with the service on its TensorRT fp16 engine (the peer on
        ONNX Runtime CUDA fp16)."""
        # ORT CUDA / TensorRT providers on fp32 + fp16 ONNX, native TensorRT engines fp16 / bf16 / fp32, larger
        # batches and loads.
        return replace(self, name=f"{self.name}-gpu", precisions=("fp32", "fp16", "bf16", "int8"),
                       tensorrt_precisions=("fp16", "bf16", "fp32"), batch_sizes=(1, 2, 4, 8, 16, 32, 64),
                       concurrency=(1, 8, 32, 128), rate=200.0, requests=4000, lone_requests=200, service=GPU_SERVICE,
                       peer_engine=GPU_PEER)


PRESETS = {
    "smoke": Preset("smoke", variants=(("convnext_atto", "gelu"), ("convnext_atto", "relu")), precisions=("fp32",),
                    batch_sizes=(1, 2, 8), iterations=3, max_seconds=2.0, concurrency=(1, 4), rate=4.0, requests=12,
                    seconds=6.0, lone_requests=3),
    "full": Preset("full", variants=(("convnext_tiny", "gelu"), ("convnext_tiny", "relu"), ("resnet50", "relu")),
                   precisions=("fp32", "int8"), batch_sizes=(1, 2, 4, 8, 16, 32), iterations=30, max_seconds=20.0,
                   concurrency=(1, 8, 32), rate=None, requests=600, seconds=60.0, lone_requests=40),
}
