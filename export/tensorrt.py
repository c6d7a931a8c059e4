"""ONNX -> TensorRT engine (fp32/fp16/bf16), cached in the model repository; no torch, TensorRT imported lazily.

TensorRT 10 builds weakly typed networks from the fp32 ONNX with the FP16/BF16 builder flag, and keeps every
normalization layer in fp32 (OBEY_PRECISION_CONSTRAINTS): LayerNorm's reductions overflow in fp16, the known
reduced-precision LayerNorm pitfall. TensorRT 11 removed those flags (strongly typed networks only): there the
precision lives in the ONNX graph, so fp16 engines are built from the fp16 ONNX variant (whose LayerNorms
export/quantize.py already keeps in fp32), bf16 engines from the bf16 variant (export/bf16.py).
"""
from __future__ import annotations

import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .repository import Artifact, ModelRepository, ModelVersion, Parity, TensorRTInfo, describe_file

ENGINE_PRECISIONS = ("fp32", "fp16", "bf16")
MAX_PROFILE_BATCH = 4096


class TensorRTError(RuntimeError):
    """TensorRT is missing, the build failed, or an engine does not fit this TensorRT / GPU."""


@dataclass(frozen=True)
class BatchProfile:
    """The optimization profile over the batch axis: an engine runs any batch in [min_batch, max_batch]."""

    min_batch: int = 1
    opt_batch: int = 8
    max_batch: int = 32

    def __post_init__(self):
        if not 1 <= self.min_batch <= self.opt_batch <= self.max_batch <= MAX_PROFILE_BATCH:
            raise ValueError(
                f"batch profile min {self.min_batch} / opt {self.opt_batch} / max {self.max_batch} must satisfy "
                f"1 <= min <= opt <= max <= {MAX_PROFILE_BATCH}"
            )

    def shapes(self, channels: int, size_px: int) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
        """(min, opt, max) NCHW shapes for IOptimizationProfile.set_shape."""
        return tuple((b, channels, size_px, size_px) for b in (self.min_batch, self.opt_batch, self.max_batch))

    def covers(self, other: "BatchProfile") -> bool:
        return self.min_batch <= other.min_batch and other.max_batch <= self.max_batch


def short_version(trt_version: str) -> str:
    """'10.13.2.6' -> '10.13' (engines are tied to the major.minor release)."""
    parts = trt_version.split(".")
    if len(parts) < 2 or not all(p.isdigit() for p in parts[:2]):
        raise ValueError(f"TensorRT version {trt_version!r} is not of the form MAJOR.MINOR[.PATCH...]")
    return ".".join(parts[:2])


def sm_tag(compute_capability: str) -> str:
    """'9.0' -> 'sm90'."""
    if not re.fullmatch(r"\d+\.\d+", compute_capability):
        raise ValueError(f"compute capability {compute_capability!r} is not of the form '9.0'")
    return "sm" + compute_capability.replace(".", "")


def engine_file_name(precision: str, trt_version: str, compute_capability: str, profile: BatchProfile) -> str:
    """e.g. engines/model.fp16.trt10.13.sm90.b1-8-32.engine"""
    if precision not in ENGINE_PRECISIONS:
        raise ValueError(f"engine precision {precision!r}: choose one of {ENGINE_PRECISIONS}")
    return (
        f"engines/model.{precision}.trt{short_version(trt_version)}.{sm_tag(compute_capability)}."
        f"b{profile.min_batch}-{profile.opt_batch}-{profile.max_batch}.engine"
    )


def check_engine_compatible(artifact: Artifact, trt_version: str, compute_capability: str) -> None:
    """Raise TensorRTError when `artifact` was not built by this TensorRT release for this GPU architecture."""
    if artifact.format != "tensorrt" or artifact.tensorrt is None:
        raise TensorRTError(f"{artifact.file} is not a TensorRT engine artifact")
    info = artifact.tensorrt
    if short_version(info.tensorrt_version) != short_version(trt_version):
        raise TensorRTError(
            f"{artifact.file} was built with TensorRT {info.tensorrt_version}, this host has {trt_version}: "
            "engines only load in the TensorRT release that built them; rebuild it (python -m export tensorrt)"
        )
    if info.compute_capability != compute_capability:
        raise TensorRTError(
            f"{artifact.file} was built for compute capability {info.compute_capability} ({info.device_name}), "
            f"this GPU is {compute_capability}; rebuild it on this GPU (python -m export tensorrt)"
        )


def is_compatible(artifact: Artifact, trt_version: str, compute_capability: str) -> bool:
    try:
        check_engine_compatible(artifact, trt_version, compute_capability)
    except TensorRTError:
        return False
    return True


def find_engine(
    version: ModelVersion, precision: str, profile: BatchProfile, trt_version: str, compute_capability: str
) -> Artifact | None:
    """A compatible engine of this precision whose batch range covers `profile`, if the version has one."""
    for artifact in version.manifest.artifacts:
        if artifact.format != "tensorrt" or artifact.precision != precision:
            continue
        info = artifact.tensorrt
        built = BatchProfile(info.min_batch, info.opt_batch, info.max_batch)
        if is_compatible(artifact, trt_version, compute_capability) and built.covers(profile):
            return artifact
    return None


def import_tensorrt():
    try:
        import tensorrt as trt
    except ImportError as error:
        raise TensorRTError(
            "TensorRT is not installed: install the gpu extra (pip install -e '.[gpu]') on a host with an NVIDIA "
            f"GPU, or serve with ONNX Runtime instead ({error})"
        ) from error
    return trt


def device_properties(device: int = 0) -> tuple[str, str]:
    """(compute capability like '9.0', device name) of a CUDA device, via cuda-python."""
    from .tensorrt_runtime import cuda_call, cudart

    props = cuda_call(cudart().cudaGetDeviceProperties(device))
    name = props.name.decode(errors="replace").rstrip("\x00") if isinstance(props.name, bytes) else str(props.name)
    return f"{props.major}.{props.minor}", name


def _weakly_typed(trt) -> bool:
    return hasattr(trt.BuilderFlag, "FP16")


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
) -> None:
    """Parse `onnx_path` and write a serialized engine to `engine_path`."""
    trt = import_tensorrt()
    if precision not in ENGINE_PRECISIONS:
        raise ValueError(f"engine precision {precision!r}: choose one of {ENGINE_PRECISIONS}")
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    weak = _weakly_typed(trt)
    flags = 0 if weak else 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(Path(onnx_path).read_bytes()):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise TensorRTError(f"TensorRT could not parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_mib << 20)
    config.builder_optimization_level = optimization_level
    if weak and precision in ("fp16", "bf16"):
        config.set_flag(trt.BuilderFlag.FP16 if precision == "fp16" else trt.BuilderFlag.BF16)
        config.set_flag(trt.BuilderFlag.OBEY_PRECISION_CONSTRAINTS)
        _keep_normalization_fp32(trt, network)
    optimization_profile = builder.create_optimization_profile()
    optimization_profile.set_shape(input_name, *profile.shapes(channels, size_px))
    config.add_optimization_profile(optimization_profile)
    cache_bytes = timing_cache.read_bytes() if timing_cache is not None and timing_cache.is_file() else b""
    cache = config.create_timing_cache(cache_bytes)
    config.set_timing_cache(cache, ignore_mismatch=True)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise TensorRTError(f"TensorRT failed to build a {precision} engine from {onnx_path} (see its log above)")
    engine_path.parent.mkdir(parents=True, exist_ok=True)
    engine_path.write_bytes(bytes(serialized))
    if timing_cache is not None:
        timing_cache.parent.mkdir(parents=True, exist_ok=True)
        timing_cache.write_bytes(bytes(config.get_timing_cache().serialize()))


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
    if weakly_typed or precision == "fp32":
        source = manifest.find("onnx", "fp32")
    else:
        source = manifest.find("onnx", precision)
    if source is None:
        wanted = "fp32" if weakly_typed or precision == "fp32" else precision
        raise TensorRTError(
            f"{manifest.name}/{manifest.version} has no {wanted} ONNX artifact to build a {precision} engine from "
            f"with this TensorRT; re-export with python -m export onnx --precisions fp32,{wanted}"
        )
    return source


def select_or_build_engine(
    version: ModelVersion,
    precision: str,
    profile: BatchProfile,
    *,
    repository_root: str | Path | None = None,
    workspace_mib: int = 4096,
    optimization_level: int = 3,
    timing_cache: str | Path | None = None,
    rebuild: bool = False,
    device: int = 0,
) -> tuple[Artifact, ModelVersion]:
    """A compatible engine from the version, or a new one built, verified against ONNX Runtime and added to it."""
    trt = import_tensorrt()
    compute_capability, device_name = device_properties(device)
    if not rebuild:
        found = find_engine(version, precision, profile, trt.__version__, compute_capability)
        if found is not None:
            return found, version
    source = onnx_source_for(version, precision, _weakly_typed(trt))
    manifest = version.manifest
    root = Path(repository_root) if repository_root is not None else version.path.parent.parent
    cache = Path(timing_cache) if timing_cache is not None else root / f".timing_cache.{sm_tag(compute_capability)}"
    relative = engine_file_name(precision, trt.__version__, compute_capability, profile)
    with tempfile.TemporaryDirectory(prefix=".engine-", dir=version.path) as tmp:
        staged = Path(tmp) / Path(relative).name
        build_engine(
            version.artifact_path(source), staged, precision, profile, input_name=manifest.input.name,
            channels=manifest.input.channels, size_px=manifest.input.height, workspace_mib=workspace_mib,
            optimization_level=optimization_level, timing_cache=cache,
        )
        parity = engine_parity(version, staged, precision)
        info = TensorRTInfo(
            tensorrt_version=trt.__version__, compute_capability=compute_capability, device_name=device_name,
            min_batch=profile.min_batch, opt_batch=profile.opt_batch, max_batch=profile.max_batch,
        )
        artifact = describe_file(Path(tmp), Path(relative).name, format="tensorrt", precision=precision,
                                 parity=parity, tensorrt=info).model_copy(update={"file": relative})
        updated = ModelRepository(root).add_artifact(manifest.name, manifest.version, staged, artifact)
    return artifact, updated


def engine_parity(version: ModelVersion, engine_path: Path, precision: str) -> Parity:
    """Run the engine and ONNX Runtime fp32 on the verification inputs; raise ParityError below the thresholds."""
    from .tensorrt_runtime import EngineRunner
    from .verify import default_image_paths, run_onnxruntime, verification_inputs, verify_against

    manifest = version.manifest
    inputs = verification_inputs(manifest.preprocess, default_image_paths())
    fp32 = manifest.find("onnx", "fp32")
    if fp32 is None:
        raise TensorRTError(f"{manifest.name}/{manifest.version} has no fp32 ONNX artifact to verify against")
    reference = run_onnxruntime(version.artifact_path(fp32), inputs.batch)
    with EngineRunner(engine_path) as runner:
        return verify_against(
            reference, runner.run, inputs, precision, "onnxruntime-fp32", f"TensorRT {precision} engine"
        )
