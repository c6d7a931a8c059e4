"""ONNX -> TensorRT engine (fp32/fp16/bf16), cached in the model repository; no torch, TensorRT imported lazily.

TensorRT 10 builds weakly typed networks from the fp32 ONNX with the FP16/BF16 builder flag, and keeps every
normalization layer in fp32 (OBEY_PRECISION_CONSTRAINTS): LayerNorm's reductions overflow in fp16, the known
reduced-precision LayerNorm pitfall. TensorRT 11 removed those flags (strongly typed networks only): there the
precision lives in the ONNX graph, so fp16 engines are built from the fp16 ONNX variant (whose LayerNorms
export/quantize.py already keeps in fp32), bf16 engines from the bf16 variant (export/bf16.py). fp32 engines are
built with TF32 off (it is on by default), so they meet the fp32 parity threshold.

An engine only loads in the exact TensorRT build that made it, on the GPU architecture it was built for: its file
name carries both (`engines/model.<precision>.trt<full version>.sm<cc>.b<min>-<opt>-<max>.engine`), and so does the
shared timing cache (`<repository>/.timing_cache.trt<full version>.sm<cc>`, written atomically). Replicas sharing
one repository build an engine once: find-or-build and the manifest update run under the version's lock
(ModelRepository.lock), and whoever gets the lock second finds the engine the first one added. An engine that
fails to deserialize is rebuilt once (open_or_rebuild) instead of failing every start.
"""
from __future__ import annotations

import logging
import re
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from convnext_files import sha256_file, write_bytes_atomic
from runtime.repository import (
    Artifact,
    ModelRepository,
    ModelVersion,
    Parity,
    TensorRTInfo,
    describe_file,
)
from runtime.tensorrt_progress import BuildPhaseLines, progress_monitor
from runtime.tensorrt_runtime import (
    EngineDeserializeError,
    TensorRTError,
    TensorRTRunner,
    cuda_call,
    cudart,
    import_tensorrt,
)
from runtime.verify import default_image_paths, run_onnxruntime, verification_inputs, verify_against

__all__ = ["EngineDeserializeError", "TensorRTError", "import_tensorrt"]  # re-exported for callers of this module

ENGINE_PRECISIONS = ("fp32", "fp16", "bf16")
MAX_PROFILE_BATCH = 4096
BUILD_LOCK_TIMEOUT_S = 1800.0  # a ConvNeXt-T engine builds in minutes; a replica waits for the one building it
VERSION_PATTERN = re.compile(r"\d+(\.\d+){1,3}")
logger = logging.getLogger("convnext.export")
Opened = TypeVar("Opened")


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
        return ((self.min_batch, channels, size_px, size_px), (self.opt_batch, channels, size_px, size_px),
                (self.max_batch, channels, size_px, size_px))

    def covers(self, other: BatchProfile) -> bool:
        return self.min_batch <= other.min_batch and other.max_batch <= self.max_batch

    @classmethod
    def of(cls, artifact: Artifact) -> BatchProfile:
        info = artifact.tensorrt
        if info is None:
            raise TensorRTError(f"{artifact.file} is not a TensorRT engine artifact")
        return cls(info.min_batch, info.opt_batch, info.max_batch)


@dataclass(frozen=True)
class BuildTarget:
    """What an engine is built for and only runs on: this TensorRT build on this GPU architecture."""

    tensorrt_version: str  # the full version, e.g. '10.13.2.6'
    compute_capability: str  # '9.0'
    device_name: str
    weakly_typed: bool  # TensorRT 10 (FP16/BF16 builder flags) vs 11 (strongly typed only)


def version_tag(trt_version: str) -> str:
    """'10.13.2.6' -> 'trt10.13.2.6': the full version, since engines are tied to the exact TensorRT build."""
    if not VERSION_PATTERN.fullmatch(trt_version):
        raise ValueError(f"TensorRT version {trt_version!r} is not of the form MAJOR.MINOR[.PATCH[.BUILD]]")
    return f"trt{trt_version}"


def sm_tag(compute_capability: str) -> str:
    """'9.0' -> 'sm90'."""
    if not re.fullmatch(r"\d+\.\d+", compute_capability):
        raise ValueError(f"compute capability {compute_capability!r} is not of the form '9.0'")
    return "sm" + compute_capability.replace(".", "")


def engine_file_name(precision: str, trt_version: str, compute_capability: str, profile: BatchProfile) -> str:
    """e.g. engines/model.fp16.trt10.13.2.6.sm90.b1-8-32.engine"""
    if precision not in ENGINE_PRECISIONS:
        raise ValueError(f"engine precision {precision!r}: choose one of {ENGINE_PRECISIONS}")
    return (
        f"engines/model.{precision}.{version_tag(trt_version)}.{sm_tag(compute_capability)}."
        f"b{profile.min_batch}-{profile.opt_batch}-{profile.max_batch}.engine"
    )


def timing_cache_name(trt_version: str, compute_capability: str) -> str:
    """e.g. .timing_cache.trt10.13.2.6.sm90 (a cache from another TensorRT build or GPU is of no use)."""
    return f".timing_cache.{version_tag(trt_version)}.{sm_tag(compute_capability)}"


def check_engine_compatible(artifact: Artifact, trt_version: str, compute_capability: str) -> None:
    """Raise TensorRTError when `artifact` was not built by this exact TensorRT build for this GPU architecture."""
    if artifact.format != "tensorrt" or artifact.tensorrt is None:
        raise TensorRTError(f"{artifact.file} is not a TensorRT engine artifact")
    info = artifact.tensorrt
    if info.tensorrt_version != trt_version:
        raise TensorRTError(
            f"{artifact.file} was built with TensorRT {info.tensorrt_version}, this host has {trt_version}: "
            "engines only load in the exact TensorRT build that made them; rebuild it (python -m export tensorrt)"
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
        if is_compatible(artifact, trt_version, compute_capability) and BatchProfile.of(artifact).covers(profile):
            return artifact
    return None


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
    """This host's TensorRT build and GPU (needs TensorRT, cuda-python and a GPU)."""
    trt = import_tensorrt()
    compute_capability, device_name = device_properties(device)
    return BuildTarget(trt.__version__, compute_capability, device_name, "FP16" in trt.BuilderFlag.__members__)


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
    weakly_typed = "FP16" in trt.BuilderFlag.__members__
    logger_ = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger_)
    # TensorRT 11 networks are always strongly typed (the flag is kept for compatibility and ignored).
    strongly_typed = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    network = builder.create_network(0 if weakly_typed or strongly_typed is None else 1 << int(strongly_typed))
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
    cache_bytes = timing_cache.read_bytes() if timing_cache is not None and timing_cache.is_file() else b""
    config.set_timing_cache(config.create_timing_cache(cache_bytes), ignore_mismatch=True)
    monitor = None if quiet else progress_monitor(trt, BuildPhaseLines())  # alive until the build returns
    if monitor is not None:
        config.progress_monitor = monitor
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise TensorRTError(f"TensorRT failed to build a {precision} engine from {onnx_path} (see its log above)")
    engine_path.parent.mkdir(parents=True, exist_ok=True)
    engine_path.write_bytes(bytes(serialized))
    if timing_cache is not None:
        write_bytes_atomic(timing_cache, bytes(config.get_timing_cache().serialize()))


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
    wanted = "fp32" if weakly_typed or precision == "fp32" else precision
    source = manifest.find("onnx", wanted)
    if source is None:
        raise TensorRTError(
            f"{manifest.name}/{manifest.version} has no {wanted} ONNX artifact to build a {precision} engine from "
            f"with this TensorRT; re-export with python -m export onnx --precisions fp32,{wanted}"
        )
    return source


# build(version, onnx source, engine path to write, precision, profile) -> the engine's parity; raises on failure.
EngineBuild = Callable[[ModelVersion, Artifact, Path, str, BatchProfile], Parity]


@dataclass(frozen=True)
class TensorRTBuild:
    """The real build step: TensorRT compiles the ONNX file, then the engine is verified against ONNX Runtime."""

    timing_cache: Path | None = None
    workspace_mib: int = 4096
    optimization_level: int = 3
    quiet: bool = False  # no build phase lines on stderr

    def __call__(self, version: ModelVersion, source: Artifact, engine_path: Path, precision: str,
                 profile: BatchProfile) -> Parity:
        spec = version.manifest.input
        build_engine(version.artifact_path(source), engine_path, precision, profile, input_name=spec.name,
                     channels=spec.channels, size_px=spec.height, workspace_mib=self.workspace_mib,
                     optimization_level=self.optimization_level, timing_cache=self.timing_cache, quiet=self.quiet)
        return engine_parity(version, engine_path, precision)


def _sound(version: ModelVersion, artifact: Artifact, replace: Artifact | None) -> bool:
    """The engine file is there, matches its sha256, and is not the one the caller could not deserialize."""
    if replace is not None and artifact.sha256 == replace.sha256:
        return False
    path = version.artifact_path(artifact)
    if not path.is_file() or sha256_file(path) != artifact.sha256:
        logger.warning("%s is missing or does not match its sha256 in the manifest; rebuilding it", path)
        return False
    return True


def find_or_build_engine(
    version: ModelVersion,
    precision: str,
    profile: BatchProfile,
    target: BuildTarget,
    build: EngineBuild,
    *,
    repository_root: str | Path | None = None,
    rebuild: bool = False,
    replace: Artifact | None = None,
    lock_timeout_s: float = BUILD_LOCK_TIMEOUT_S,
) -> tuple[Artifact, ModelVersion]:
    """A fitting engine from the version on disk, or one built (once across processes) and added to it.

    The manifest is re-read from disk (a caller's ModelVersion may be stale); building and adding run under the
    version's lock, after a re-check, so a process that waited for the lock uses the engine the other one added.
    `replace`: an engine that failed to deserialize; it is rebuilt (same profile and file) unless already replaced.
    """
    name, number = version.manifest.name, version.manifest.version
    repository = ModelRepository(repository_root if repository_root is not None else version.path.parent.parent)

    def fitting() -> tuple[Artifact | None, ModelVersion]:
        current = repository.load(name, number, verify_files=False)
        found = find_engine(current, precision, profile, target.tensorrt_version, target.compute_capability)
        return found, current

    if not rebuild:  # the common case needs no lock (nor write access to the repository)
        found, current = fitting()
        if found is not None and _sound(current, found, replace):
            return found, current
    with repository.lock(name, number, lock_timeout_s):
        found, current = fitting()
        if not rebuild and found is not None and _sound(current, found, replace):
            return found, current
        build_profile = BatchProfile.of(found) if found is not None and not rebuild else profile
        return _build_and_add(repository, current, precision, build_profile, target, build)


def _build_and_add(repository: ModelRepository, version: ModelVersion, precision: str, profile: BatchProfile,
                   target: BuildTarget, build: EngineBuild) -> tuple[Artifact, ModelVersion]:
    manifest = version.manifest
    source = onnx_source_for(version, precision, target.weakly_typed)
    relative = engine_file_name(precision, target.tensorrt_version, target.compute_capability, profile)
    with tempfile.TemporaryDirectory(prefix=".engine-", dir=version.path) as tmp:
        staged = Path(tmp) / Path(relative).name
        parity = build(version, source, staged, precision, profile)
        info = TensorRTInfo(
            tensorrt_version=target.tensorrt_version, compute_capability=target.compute_capability,
            device_name=target.device_name, min_batch=profile.min_batch, opt_batch=profile.opt_batch,
            max_batch=profile.max_batch,
        )
        artifact = describe_file(Path(tmp), staged.name, format="tensorrt", precision=precision, parity=parity,
                                 tensorrt=info).model_copy(update={"file": relative})
        updated = repository.add_artifact(manifest.name, manifest.version, staged, artifact)
    return artifact, updated


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
    replace: Artifact | None = None,
    device: int = 0,
    lock_timeout_s: float = BUILD_LOCK_TIMEOUT_S,
    quiet: bool = False,
) -> tuple[Artifact, ModelVersion]:
    """A compatible engine from the version, or a new one built, verified against ONNX Runtime and added to it.

    A build prints TensorRT's phases on stderr (runtime/tensorrt_progress.py) unless `quiet`.
    """
    target = tensorrt_target(device)
    root = Path(repository_root) if repository_root is not None else version.path.parent.parent
    cache = Path(timing_cache) if timing_cache is not None else root / timing_cache_name(
        target.tensorrt_version, target.compute_capability)
    return find_or_build_engine(
        version, precision, profile, target, TensorRTBuild(cache, workspace_mib, optimization_level, quiet),
        repository_root=root, rebuild=rebuild, replace=replace, lock_timeout_s=lock_timeout_s,
    )


def open_or_rebuild(
    select: Callable[[Artifact | None], tuple[Artifact, ModelVersion]],
    open_engine: Callable[[ModelVersion, Artifact], Opened],
) -> tuple[Opened, Artifact, ModelVersion]:
    """Select an engine and open it; if it fails to deserialize, have it rebuilt (once) and open that one.

    select(replace) is find-or-build (replace: the engine that failed, or None); open_engine deserializes.
    """
    artifact, version = select(None)
    try:
        return open_engine(version, artifact), artifact, version
    except EngineDeserializeError as error:
        logger.warning("%s: %s; rebuilding it", version.artifact_path(artifact), error)
    artifact, version = select(artifact)
    return open_engine(version, artifact), artifact, version


def engine_parity(version: ModelVersion, engine_path: Path, precision: str) -> Parity:
    """Run the engine and ONNX Runtime fp32 on the verification inputs; raise ParityError below the thresholds.

    The runner splits the inputs into calls within the engine's batch profile (10 inputs with the photos).
    """
    manifest = version.manifest
    inputs = verification_inputs(manifest.preprocess, default_image_paths())
    fp32 = manifest.find("onnx", "fp32")
    if fp32 is None:
        raise TensorRTError(f"{manifest.name}/{manifest.version} has no fp32 ONNX artifact to verify against")
    reference = run_onnxruntime(version.artifact_path(fp32), inputs.batch)
    with TensorRTRunner(engine_path) as runner:
        return verify_against(
            reference, runner.run, inputs, precision, "onnxruntime-fp32", f"TensorRT {precision} engine"
        )
