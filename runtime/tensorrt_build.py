"""ONNX -> TensorRT engine (fp32/fp16/bf16) on this GPU, then its parity against ONNX Runtime; TensorRT imported lazily.

TensorRT 10 builds weakly typed networks from the fp32 ONNX with the FP16/BF16 builder flag, and keeps every
normalization layer in fp32 (OBEY_PRECISION_CONSTRAINTS): LayerNorm's reductions overflow in fp16, the known
reduced-precision LayerNorm pitfall. TensorRT 11 removed those flags (strongly typed networks only): there the
precision lives in the ONNX graph, so fp16 engines are built from the fp16 ONNX variant (whose LayerNorms
export/quantize.py already keeps in fp32), bf16 engines from the bf16 variant (export/bf16.py). fp32 engines are
built with TF32 off (it is on by default), so they meet the fp32 parity threshold.

The timing cache (the kernels' measured times, reused by the next build) is of this GPU: TensorRT checks its header
against the device's CUDA properties, and a cache it refuses is replaced by a fresh one rather than forced in.
"""
from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from convnext_files import write_bytes_atomic
from runtime.repository import Artifact, ModelVersion, Parity
from runtime.tensorrt_files import ENGINE_PRECISIONS, BatchProfile, BuildTarget, onnx_precision_for
from runtime.tensorrt_progress import BuildPhaseLines, interrupts_noted, progress_monitor
from runtime.tensorrt_runtime import (
    TensorRTError,
    TensorRTRunner,
    cuda_call,
    cudart,
    import_tensorrt,
    use_cuda_device,
    weakly_typed,
)
from runtime.verify import default_image_paths, run_onnxruntime, verification_inputs, verify_against

logger = logging.getLogger("convnext.export")


def builder_flags(precision: str, available: Iterable[str]) -> tuple[frozenset[str], frozenset[str]]:
    """(flags to set, flags to clear), by trt.BuilderFlag name, for an engine of `precision` with this TensorRT.

    fp32: clear TF32 (on by default in TensorRT 10 and 11), so convolutions and matmuls run in fp32.
    fp16 / bf16 with TensorRT 10 (it has the FP16 flag): the precision flag plus OBEY_PRECISION_CONSTRAINTS, so the
    normalization layers pinned to fp32 stay fp32. With TensorRT 11 the ONNX graph carries the precision: no flag.
    """
    if precision not in ENGINE_PRECISIONS:
        raise ValueError(f"engine precision {precision!r}: choose one of {ENGINE_PRECISIONS}")
    available = frozenset(available)
    to_set: set[str] = set()
    to_clear: set[str] = set()
    if precision == "fp32":
        to_clear.add("TF32")
    elif "FP16" in available:  # weakly typed (TensorRT 10)
        to_set |= {precision.upper(), "OBEY_PRECISION_CONSTRAINTS"}
    missing = (to_set | to_clear) - available
    if missing:
        raise TensorRTError(f"this TensorRT has no builder flag {sorted(missing)} needed for a {precision} engine")
    return frozenset(to_set), frozenset(to_clear)


def device_properties(device: int = 0) -> tuple[str, str]:
    """(compute capability like '9.0', device name) of a CUDA device, via cuda-python."""
    props = cuda_call(cudart().cudaGetDeviceProperties(device))
    name = props.name.decode(errors="replace").rstrip("\x00") if isinstance(props.name, bytes) else str(props.name)
    return f"{props.major}.{props.minor}", name


def tensorrt_target(device: int = 0) -> BuildTarget:
    """This host's TensorRT build and its GPU `device` (needs TensorRT, cuda-python and a GPU)."""
    trt = import_tensorrt()
    compute_capability, device_name = device_properties(device)
    return BuildTarget(trt.__version__, compute_capability, device_name, weakly_typed(trt), device)


def build_engine(
    onnx_path: Path,
    engine_path: Path,
    precision: str,
    profile: BatchProfile,
    *,
    input_name: str = "input",
    channels: int = 3,
    size_px: int = 224,
    workspace_mib: int = 4096,
    optimization_level: int = 3,
    timing_cache: Path | None = None,
    quiet: bool = False,
) -> None:
    """Parse `onnx_path` and write a serialized engine to `engine_path`; its phases on stderr unless `quiet`."""
    trt = import_tensorrt()
    to_set, to_clear = builder_flags(precision, trt.BuilderFlag.__members__)
    logger_ = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger_)
    # No creation flags: weakly typed on TensorRT 10 (the builder flags above choose the precision); on TensorRT 11
    # every network is strongly typed, and NetworkDefinitionCreationFlag "STRONGLY_TYPED : [DEPRECATED] Deprecated
    # in TensorRT 11.0. Strongly typed mode is always enabled. This flag is retained for API compatibility but is
    # ignored." (TensorRT 11.0.0 Python API reference, Builder).
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger_)
    if not parser.parse(Path(onnx_path).read_bytes(), str(onnx_path)):  # the path finds external-data weights
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise TensorRTError(f"TensorRT could not parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_mib << 20)
    config.builder_optimization_level = optimization_level
    for name in sorted(to_set):
        config.set_flag(getattr(trt.BuilderFlag, name))
    for name in sorted(to_clear):
        config.clear_flag(getattr(trt.BuilderFlag, name))
    if "OBEY_PRECISION_CONSTRAINTS" in to_set:
        _keep_normalization_fp32(trt, network)
    optimization_profile = builder.create_optimization_profile()
    optimization_profile.set_shape(input_name, *profile.shapes(channels, size_px))
    config.add_optimization_profile(optimization_profile)
    attach_timing_cache(config, timing_cache)
    # alive until the build returns; with --quiet too, so that a Ctrl-C cancels the build
    monitor = progress_monitor(trt, None if quiet else BuildPhaseLines())
    if monitor is not None:
        config.progress_monitor = monitor
    with interrupts_noted(monitor):
        serialized = builder.build_serialized_network(network, config)
    interruption = getattr(monitor, "interruption", None)
    if interruption is not None:  # a Ctrl-C during the build: it cancelled the build
        raise interruption
    if serialized is None:
        raise TensorRTError(f"TensorRT failed to build a {precision} engine from {onnx_path} (see its log above)")
    engine_path.parent.mkdir(parents=True, exist_ok=True)
    engine_path.write_bytes(bytes(serialized))
    if timing_cache is not None:
        write_bytes_atomic(timing_cache, bytes(config.get_timing_cache().serialize()))


def attach_timing_cache(config, timing_cache: Path | None) -> None:
    """Give the builder config the cache in `timing_cache` (a fresh one when there is none, or TensorRT refuses it).

    ignore_mismatch=False: "The timing cache has verification header to make sure the provided cache can be used in
    current environment. A failure will be reported if the CUDA device property in the provided cache is different
    from current environment." (IBuilderConfig.set_timing_cache); forcing one in is what the C++ reference warns of:
    "Combining caches generated from devices with different device properties may lead to functional/performance
    bugs!" (ITimingCache::combine). The config keeps the cache alive (the binding's keep_alive) through the build.
    """
    data = timing_cache.read_bytes() if timing_cache is not None and timing_cache.is_file() else b""
    cache = config.create_timing_cache(data)
    if cache is not None and config.set_timing_cache(cache, ignore_mismatch=False):
        return
    logger.warning("TensorRT refused the timing cache %s (made by another TensorRT build or GPU): building with a "
                   "fresh one, which replaces it", timing_cache)
    cache = config.create_timing_cache(b"")
    if cache is None or not config.set_timing_cache(cache, ignore_mismatch=False):
        raise TensorRTError("TensorRT refused an empty timing cache (see its log above)")


def _keep_normalization_fp32(trt, network) -> int:
    """Pin every normalization layer (and its output) to fp32; returns how many were pinned."""
    pinned = 0
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        if layer.type == trt.LayerType.NORMALIZATION:
            layer.precision = trt.float32
            layer.set_output_type(0, trt.float32)
            pinned += 1
    return pinned


def onnx_source_for(version: ModelVersion, precision: str, weakly_typed: bool) -> Artifact:
    """The ONNX file an engine of `precision` is built from (TensorRT 11: the precision must be in the graph)."""
    manifest = version.manifest
    wanted = onnx_precision_for(precision, weakly_typed)
    source = manifest.find("onnx", wanted)
    if source is None:
        raise TensorRTError(
            f"{manifest.name}/{manifest.version} has no {wanted} ONNX artifact to build a {precision} engine from "
            f"with this TensorRT; re-export with python -m export onnx --precisions fp32,{wanted}"
        )
    return source


@dataclass(frozen=True)
class TensorRTBuild:
    """The real build step: TensorRT compiles the ONNX file, then the engine is verified against ONNX Runtime, both
    on CUDA device `device` (made current first: TensorRT builds and runs on the current device)."""

    timing_cache: Path | None = None
    workspace_mib: int = 4096
    optimization_level: int = 3
    quiet: bool = False  # no build phase lines on stderr
    device: int = 0

    def __call__(self, version: ModelVersion, source: Artifact, engine_path: Path, precision: str,
                 profile: BatchProfile) -> Parity:
        spec = version.manifest.input
        use_cuda_device(self.device)
        build_engine(version.artifact_path(source), engine_path, precision, profile, input_name=spec.name,
                     channels=spec.channels, size_px=spec.height, workspace_mib=self.workspace_mib,
                     optimization_level=self.optimization_level, timing_cache=self.timing_cache, quiet=self.quiet)
        return engine_parity(version, engine_path, precision, self.device)


def engine_parity(version: ModelVersion, engine_path: Path, precision: str, device: int | None = None) -> Parity:
    """Run the engine (on CUDA device `device`, default the current one) and ONNX Runtime fp32 on the verification
    inputs; raise ParityError below the thresholds.

    The runner splits the inputs into calls within the engine's batch profile (10 inputs with the photos).
    """
    manifest = version.manifest
    inputs = verification_inputs(manifest.preprocess, default_image_paths())
    fp32 = manifest.find("onnx", "fp32")
    if fp32 is None:
        raise TensorRTError(f"{manifest.name}/{manifest.version} has no fp32 ONNX artifact to verify against")
    reference = run_onnxruntime(version.artifact_path(fp32), inputs.batch)
    # buffers for these inputs, not for the profile's largest batch (up to 4096 images, pinned and on the device)
    with TensorRTRunner(engine_path, device=device, max_batch_size=len(inputs.batch)) as runner:
        return verify_against(
            reference, runner.run, inputs, precision, "onnxruntime-fp32", f"TensorRT {precision} engine"
        )
