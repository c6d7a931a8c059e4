"""TensorRT engine files: what an engine is built for, its file name, and which engines of a version fit this GPU.

An engine only loads in the exact TensorRT build that made it, and it is made for one GPU device model: TensorRT
picks its kernels by timing them on that GPU, and given a plan from another model of the same architecture (an
H100 PCIe engine on an H200, both sm90) it warns "Using an engine plan file across different models of devices is
not recommended and is likely to affect performance or even cause errors." The builds here set no hardware
compatibility level (TensorRT's default, HardwareCompatibilityLevel.NONE; SAME_COMPUTE_CAPABILITY would let one
engine run on every sm90 GPU, tuned for none but the one that built it, and "may decrease the performance compared
to an engine with no compatibility", its API reference says), so an engine fits only where the
TensorRT version, the compute capability and the device model all match what its manifest entry records, and its
file name carries all three, so device models of one architecture sharing a repository get one engine each:

    engines/model.<precision>.trt<full version>.sm<cc>-<device model>.b<min>-<opt>-<max>.engine
    e.g. engines/model.fp16.trt10.13.2.6.sm90-h100-pcie.b1-8-32.engine

An engine named before the device model was in the name (`....sm90.b1-8-32.engine`) still fits its own device
model: the manifest entry, not the name, is checked. The timing cache is per device model too (TensorRT checks its
header against the GPU's device properties): `<repository>/.timing_cache.trt<full version>.sm<cc>-<device model>`.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from runtime.repository import Artifact, ModelVersion
from runtime.tensorrt_runtime import TensorRTError

ENGINE_PRECISIONS = ("fp32", "fp16", "bf16")
MAX_PROFILE_BATCH = 4096
MAX_DEVICE_MODEL_CHARS = 64  # CUDA device names are far shorter; this bounds a file name all the same
VERSION_PATTERN = re.compile(r"\d+(\.\d+){1,3}")


def onnx_precision_for(precision: str, weakly_typed: bool) -> str:
    """The precision of the ONNX file an engine of `precision` is built from: TensorRT 10 (weakly typed) builds every
    precision from the fp32 graph with builder flags, TensorRT 11 only from a graph already in that precision."""
    return "fp32" if weakly_typed or precision == "fp32" else precision


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
    """What an engine is built for and only runs on: this TensorRT build on this GPU device model, and the GPU (by
    CUDA device index) the build and its parity check run on."""

    tensorrt_version: str  # the full version, e.g. '10.13.2.6'
    compute_capability: str  # '9.0'
    device_name: str  # as CUDA names it, e.g. 'NVIDIA H100 PCIe'
    weakly_typed: bool  # TensorRT 10 (FP16/BF16 builder flags) vs 11 (strongly typed only)
    device: int = 0


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


def device_model(device_name: str) -> str:
    """'NVIDIA H100 PCIe' -> 'h100-pcie', 'NVIDIA H100 80GB HBM3' -> 'h100-80gb-hbm3': the device model as file names
    carry it and as engines are matched by it, so a name and a match never disagree."""
    slug = re.sub(r"[^a-z0-9]+", "-", device_name.lower()).strip("-")
    slug = slug.removeprefix("nvidia-")[:MAX_DEVICE_MODEL_CHARS].strip("-")
    if not slug:
        raise ValueError(f"GPU device name {device_name!r} has no letters or digits to name its engines by")
    return slug


def device_tag(target: BuildTarget) -> str:
    """e.g. 'sm90-h100-pcie': the architecture, then the device model."""
    return f"{sm_tag(target.compute_capability)}-{device_model(target.device_name)}"


def engine_file_name(precision: str, target: BuildTarget, profile: BatchProfile) -> str:
    """e.g. engines/model.fp16.trt10.13.2.6.sm90-h100-pcie.b1-8-32.engine"""
    if precision not in ENGINE_PRECISIONS:
        raise ValueError(f"engine precision {precision!r}: choose one of {ENGINE_PRECISIONS}")
    return (
        f"engines/model.{precision}.{version_tag(target.tensorrt_version)}.{device_tag(target)}."
        f"b{profile.min_batch}-{profile.opt_batch}-{profile.max_batch}.engine"
    )


def timing_cache_name(target: BuildTarget) -> str:
    """e.g. .timing_cache.trt10.13.2.6.sm90-h100-pcie (a cache from another TensorRT build or GPU is of no use)."""
    return f".timing_cache.{version_tag(target.tensorrt_version)}.{device_tag(target)}"


def check_engine_compatible(artifact: Artifact, target: BuildTarget) -> None:
    """Raise TensorRTError when `artifact` was not built by this exact TensorRT build on this GPU device model."""
    if artifact.format != "tensorrt" or artifact.tensorrt is None:
        raise TensorRTError(f"{artifact.file} is not a TensorRT engine artifact")
    info = artifact.tensorrt
    if info.tensorrt_version != target.tensorrt_version:
        raise TensorRTError(
            f"{artifact.file} was built with TensorRT {info.tensorrt_version}, this host has "
            f"{target.tensorrt_version}: engines only load in the exact TensorRT build that made them; rebuild it "
            "(python -m export tensorrt)"
        )
    if info.compute_capability != target.compute_capability:
        raise TensorRTError(
            f"{artifact.file} was built for compute capability {info.compute_capability} ({info.device_name}), "
            f"this GPU is {target.compute_capability}; rebuild it on this GPU (python -m export tensorrt)"
        )
    if device_model(info.device_name) != device_model(target.device_name):
        raise TensorRTError(
            f"{artifact.file} was built on {info.device_name}, this GPU is {target.device_name}: an engine is tuned "
            "for the device model it was built on, even within one architecture; rebuild it on this GPU "
            "(python -m export tensorrt)"
        )


def is_compatible(artifact: Artifact, target: BuildTarget) -> bool:
    try:
        check_engine_compatible(artifact, target)
    except TensorRTError:
        return False
    return True


def find_engine(version: ModelVersion, precision: str, profile: BatchProfile, target: BuildTarget) -> Artifact | None:
    """The best compatible engine of this precision whose batch range covers `profile`, if the version has one.

    Of several, the one whose opt batch is nearest `profile`'s (TensorRT picks each layer's kernels at the opt shape),
    then the one with the narrowest range (a batch-64 profile can cost the batch-8 case), then the first listed.
    """
    fitting = [artifact for artifact in version.manifest.artifacts
               if artifact.format == "tensorrt" and artifact.precision == precision
               and is_compatible(artifact, target) and BatchProfile.of(artifact).covers(profile)]

    def mismatch(artifact: Artifact) -> tuple[int, int]:
        built = BatchProfile.of(artifact)
        return abs(built.opt_batch - profile.opt_batch), built.max_batch - built.min_batch

    return min(fitting, key=mismatch, default=None)
