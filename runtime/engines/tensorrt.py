"""Native TensorRT engine: the Engine interface over export's TensorRTRunner (pinned buffers, one CUDA stream)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from runtime.engines.base import EngineError, ModelFileEngine
from runtime.repository import Artifact, ModelVersion
from runtime.tensorrt import BatchProfile, open_or_rebuild, select_or_build_engine
from runtime.tensorrt_files import ENGINE_PRECISIONS
from runtime.tensorrt_runtime import GPU_INSTALL_HINT, EngineDeserializeError, TensorRTError, TensorRTRunner


class TensorRTEngine(ModelFileEngine):
    """One serialized engine. `model`: the repository version (and manifest) the engine belongs to, when known."""

    name = "tensorrt"
    provider = "tensorrt"

    def __init__(self, engine_path: Path, input_shape: tuple[int, int, int], *, precision: str = "fp16",
                 max_batch_size: int = 16, input_name: str = "input", output_name: str = "logits",
                 model: ModelVersion | None = None):
        super().__init__(engine_path, input_shape, input_name=input_name, precision=precision,
                         max_batch_size=max_batch_size)
        self.output_name = output_name
        self.model = model
        self.runner: TensorRTRunner | None = None

    def load(self) -> None:
        """Deserialize the engine and allocate its buffers; a second call keeps the loaded engine."""
        if self.runner is not None:
            return
        try:
            runner = TensorRTRunner(self.model_path, max_batch_size=self.max_batch_size,
                                    input_shape=self.input_shape)
        except EngineDeserializeError:
            raise  # the caller may rebuild the engine (open_tensorrt_engine)
        except TensorRTError as err:
            raise EngineError(f"the tensorrt engine needs TensorRT and cuda-python on an NVIDIA GPU host ({err}); "
                              f"{GPU_INSTALL_HINT}; or use --engine onnxruntime") from None
        if (runner.input_name, runner.output_name) != (self.input_name, self.output_name):
            runner.close()
            raise EngineError(f"{self.model_path} has tensors {runner.input_name!r} -> {runner.output_name!r}, the "
                              f"manifest says {self.input_name!r} -> {self.output_name!r}; rebuild the engine")
        self.runner = runner
        self.max_batch_size = runner.max_batch

    def run(self, batch: np.ndarray) -> np.ndarray:
        if self.runner is None:
            raise EngineError("the engine is not loaded; call load() first")
        return self.runner.run(batch)

    def close(self) -> None:
        if self.runner is not None:
            self.runner.close()
            self.runner = None


def check_tensorrt_precision(precision: str) -> None:
    """EngineError for a precision TensorRT engines are not built in (int8), before anything is built or locked."""
    if precision not in ENGINE_PRECISIONS:
        raise EngineError(f"--engine tensorrt builds {'/'.join(ENGINE_PRECISIONS)} engines, not {precision}; int8 runs "
                          "on --engine onnxruntime or openvino")


def tensorrt_profile(max_batch_size: int) -> BatchProfile:
    """The batch profile the service builds its engine for: 1 to max_batch_size, tuned at max_batch_size."""
    try:
        return BatchProfile(1, max_batch_size, max_batch_size)
    except ValueError as err:
        raise EngineError(f"--engine tensorrt --max-batch-size {max_batch_size}: {err}") from None


def open_tensorrt_engine(version: ModelVersion, precision: str, max_batch_size: int,
                         repository_root: str | Path | None = None) -> TensorRTEngine:
    """The version's engine for this GPU (built and added on first start), loaded; rebuilt once if it will not load.

    The engine knows the version it came from, re-read from the repository: another replica may have added it.
    """
    check_tensorrt_precision(precision)
    manifest = version.manifest
    shape = (manifest.input.channels, manifest.input.height, manifest.input.width)
    profile = tensorrt_profile(max_batch_size)

    def select(replace: Artifact | None) -> tuple[Artifact, ModelVersion]:
        return select_or_build_engine(version, precision, profile, repository_root=repository_root, replace=replace)

    def open_engine(current: ModelVersion, artifact: Artifact) -> TensorRTEngine:
        engine = TensorRTEngine(current.artifact_path(artifact), shape, precision=precision,
                                max_batch_size=max_batch_size, input_name=manifest.input.name,
                                output_name=manifest.output_name, model=current)
        engine.load()
        return engine

    engine, _, _ = open_or_rebuild(select, open_engine)
    return engine
