"""The engine interface: load, warm up, run one batch of preprocessed images into logits, describe, close."""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import numpy as np


class EngineError(RuntimeError):
    """An engine could not be loaded or could not run a batch."""


@dataclass(frozen=True)
class EngineDescription:
    name: str  # "onnxruntime" / "tensorrt"
    input_name: str
    input_shape: tuple[int, int, int]  # (C, H, W) of one image
    max_batch_size: int
    precision: str
    provider: str
    max_concurrent_batches: int = 1  # batches the engine runs at once (Engine.max_concurrent_batches)
    # engine "auto" only: images/s each candidate engine reached in the start-up measurement (runtime/engines/auto.py)
    auto_images_per_s: dict[str, float] | None = None


class Engine(ABC):
    """Decode and encode stay outside: run() takes float32 NCHW and returns float32 (N, num_classes) logits.

    run() finishes with its input before it returns (the caller reuses the buffer) and returns an array of its own.
    """

    # How many run() calls may be in flight at once, each from its own thread, once loaded. One for most engines;
    # OpenVINO's THROUGHPUT hint splits the cores into streams that only pay with several batches in flight.
    max_concurrent_batches: int = 1

    @abstractmethod
    def load(self) -> None: ...

    @abstractmethod
    def run(self, batch: np.ndarray) -> np.ndarray: ...

    @abstractmethod
    def describe(self) -> EngineDescription: ...

    def warmup(self, runs: int = 2) -> None:
        """Run batches of 1 and of max_batch_size so the first real request pays no allocation cost."""
        spec = self.describe()
        for size in sorted({1, spec.max_batch_size}):
            batch = np.zeros((size, *spec.input_shape), dtype=np.float32)
            for _ in range(runs):
                self.run(batch)

    def close(self) -> None:  # noqa: B027 (optional: engines without resources need not override it)
        """Free the engine's resources; the default has none."""


class ModelFileEngine(Engine):
    """An engine over one model file (ONNX, or a serialized TensorRT engine): the fields every such engine has, and
    describe() built from them plus the subclass's `name` and `provider`."""

    name: str  # EngineDescription.name: "onnxruntime" / "openvino" / "tensorrt"
    provider: str  # where the engine runs: a class attribute, or an instance one where it is a constructor option

    def __init__(self, model_path: Path, input_shape: tuple[int, int, int], *, input_name: str, precision: str,
                 max_batch_size: int):
        self.model_path = Path(model_path)
        self.input_shape = cast(tuple[int, int, int], tuple(input_shape))  # (C, H, W), whatever sequence came in
        self.input_name = input_name  # the manifest's; load() may replace it with the name the model file has
        self.precision = precision
        self.max_batch_size = max_batch_size

    def describe(self) -> EngineDescription:
        return EngineDescription(self.name, self.input_name, self.input_shape, self.max_batch_size, self.precision,
                                 self.provider, max_concurrent_batches=self.max_concurrent_batches)
