"""The engine interface: load, warm up, run one batch of preprocessed images into logits, describe, close."""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

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


class Engine(ABC):
    """Decode and encode stay outside: run() takes float32 NCHW and returns float32 (N, num_classes) logits."""

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

    def close(self) -> None:  # noqa: B027 (optional: only engines that hold resources free them)
        """Free the engine's resources; the default has none."""
