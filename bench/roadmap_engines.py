"""Which engines a roadmap run times (CPU, GPU or named ones), the GPU ones timed, and failed engines set aside.

GPU engines: native TensorRT fp16 and bf16 engines (runtime/tensorrt.py builds and verifies them; the service's own
TensorRTEngine is timed by bench/engine_benchmark.py's benchmark_tensorrt) and ONNX Runtime CUDA fp32. TensorRT 11
builds strongly typed networks only, so each step exports the fp16 / bf16 ONNX variant its engine is built from.
Everything but the probe and the timing is pure, so it is tested without a GPU. The GPU engines are timed one step
after another (bench/roadmap.py: each step's engines built, verified and timed in turn), not in the CPU engines'
interleaved rounds (bench/roadmap_timing.py).
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from runtime.ort_session import available_provider
from runtime.tensorrt import tensorrt_target

from .engine_benchmark import benchmark_onnx, benchmark_tensorrt

CPU_ENGINES = ("onnxruntime-fp32", "pytorch-eager-fp32", "openvino-f32", "openvino-bf16")
# name -> (kind, precision); TensorRT fp16 first: the verdicts read the first engine, and fp16 is the service's.
GPU_ENGINES = {"tensorrt-fp16": ("tensorrt", "fp16"), "tensorrt-bf16": ("tensorrt", "bf16"),
               "onnxruntime-cuda-fp32": ("onnxruntime-cuda", "fp32")}
GROUPS = {"cpu": CPU_ENGINES, "gpu": tuple(GPU_ENGINES)}
BF16_MIN_COMPUTE_CAPABILITY = (8, 0)  # Ampere: the first GPUs with bfloat16 tensor cores


@dataclass(frozen=True)
class EnginePlan:
    """The CPU engines to time (those available here), the GPU engines to time, and why a requested one is not."""

    cpu: tuple[str, ...]
    gpu: tuple[str, ...]
    skipped: dict[str, str]

    @property
    def engines(self) -> list[str]:
        return [*self.cpu, *self.gpu]


def select_engines(requested: Sequence[str]) -> list[str]:
    """Engine names from `--engines`: names and groups ("cpu", "gpu"), expanded in order, each once."""
    unknown = [name for name in requested if name not in GROUPS and name not in CPU_ENGINES + tuple(GPU_ENGINES)]
    if unknown:
        raise ValueError(f"unknown engines {unknown}: choose groups {sorted(GROUPS)} or engines "
                         f"{[*CPU_ENGINES, *GPU_ENGINES]}")
    names = [engine for name in requested for engine in GROUPS.get(name, (name,))]
    return list(dict.fromkeys(names))


def plan_engines(selected: Sequence[str], cpu_available: Iterable[str], cpu_skipped: Mapping[str, str]) -> EnginePlan:
    """The selected engines split by device; a selected CPU engine this host cannot run is skipped with its reason
    (cpu_skipped keys may name a family, e.g. "openvino" for both OpenVINO engines)."""
    available = set(cpu_available)
    cpu = tuple(e for e in selected if e in CPU_ENGINES and e in available)
    skipped = {}
    for engine in selected:
        if engine in CPU_ENGINES and engine not in available:
            family = next((k for k in cpu_skipped if engine.startswith(k)), None)
            if family is not None:
                skipped[family] = cpu_skipped[family]
            else:
                skipped[engine] = "not available on this host"
    return EnginePlan(cpu, tuple(e for e in selected if e in GPU_ENGINES), skipped)


def onnx_precisions(gpu_engines: Iterable[str], weakly_typed: bool = False) -> tuple[str, ...]:
    """The ONNX variants a step exports: fp32 always; with TensorRT 11 (strongly typed) the fp16 / bf16 variant
    each TensorRT engine is built from (runtime.tensorrt_build.onnx_source_for); TensorRT 10 builds from fp32."""
    wanted = ["fp32"]
    for engine in gpu_engines:
        kind, precision = GPU_ENGINES[engine]
        if kind == "tensorrt" and not weakly_typed:
            wanted.append(precision)
    return tuple(dict.fromkeys(wanted))


def runs_bf16(compute_capability: str) -> bool:
    """Whether a GPU of this compute capability ('7.5') has bfloat16 tensor cores."""
    major, minor = (int(part) for part in compute_capability.split("."))
    return (major, minor) >= BF16_MIN_COMPUTE_CAPABILITY


def bf16_problem(compute_capability: str, device_name: str) -> str | None:
    """Why this GPU cannot run a bf16 engine, or None (scripts/gpu_check.sh and the GPU tests allow a skip that says
    "needs a GPU of compute capability >= 8.0")."""
    if runs_bf16(compute_capability):
        return None
    return (f"bf16 needs a GPU of compute capability >= 8.0 (Ampere or newer); {device_name} is "
            f"{compute_capability}")


def gpu_engines_for(compute_capability: str) -> tuple[str, ...]:
    """The `gpu` group's engines a GPU of this compute capability runs: tensorrt-bf16 from Ampere (8.0) on only."""
    return tuple(e for e in GPU_ENGINES if GPU_ENGINES[e][1] != "bf16" or runs_bf16(compute_capability))


def gpu_problem(gpu_engines: Sequence[str]):
    """(why this host cannot run `gpu_engines`, as one line, or None; the TensorRT BuildTarget, or None)."""
    target, problems = None, []
    tensorrt = [e for e in gpu_engines if GPU_ENGINES[e][0] == "tensorrt"]
    if tensorrt:
        try:
            target = tensorrt_target()
        except Exception as err:  # noqa: BLE001 - any failure of the probe is why TensorRT cannot run here
            problems.append(f"{', '.join(tensorrt)} need an NVIDIA GPU with TensorRT and cuda-python: {err}")
        else:
            bf16 = bf16_problem(target.compute_capability, target.device_name) if "tensorrt-bf16" in tensorrt else None
            problems.append(f"tensorrt-bf16: {bf16}; leave tensorrt-bf16 out of --engines" if bf16 else None)
    if "onnxruntime-cuda-fp32" in gpu_engines:
        try:
            available_provider("cuda")
        except Exception as err:  # noqa: BLE001 - e.g. the CPU onnxruntime: no CUDAExecutionProvider
            problems.append(f"onnxruntime-cuda-fp32 needs onnxruntime-gpu on an NVIDIA GPU host: {err}")
    found = [" ".join(p.split()) for p in problems if p]
    return ("; ".join(found) or None), target


def points_from(engine_results: Iterable) -> dict[str, dict]:
    """bench.engine_benchmark EngineResults -> the roadmap's points: {batch: {images_per_s, p50_ms, calls}}, and
    opt_batch for a TensorRT engine (its profile's opt: the batch its kernels were chosen for)."""
    return {str(r.batch_size): {"images_per_s": r.images_per_s, "p50_ms": r.p50_ms, "calls": r.iterations,
                                **({} if r.opt_batch is None else {"opt_batch": r.opt_batch})}
            for r in engine_results}


def time_gpu_engine(engine: str, version, batch_sizes: Sequence[int], seconds: float, threads: int) -> dict:
    """One GPU engine on one step's repository version: its points per batch size.

    TensorRT: the engine is found or built (and verified against ONNX Runtime fp32) in the version, with opt = the
    largest batch size (engine_benchmark.tensorrt_profile, as the service's), then the service's TensorRTEngine is
    timed, host<->device copies included. ONNX Runtime CUDA: the fp32 ONNX file.
    """
    kind, precision = GPU_ENGINES[engine]
    timing = {"warmup": 2, "iterations": 10**6, "max_seconds": seconds}
    if kind == "tensorrt":
        return points_from(benchmark_tensorrt(version, precision, batch_sizes, **timing))
    onnx_path = version.artifact_path(version.manifest.find("onnx", "fp32"))
    return points_from(benchmark_onnx(onnx_path, batch_sizes, provider="cuda", threads=threads, **timing))


def engine_parities(artifacts: Iterable, engines: Iterable[str]) -> dict[str, dict]:
    """Each timed TensorRT engine's parity against ONNX Runtime fp32, as its build recorded it in the manifest."""
    artifacts, out = tuple(artifacts), {}
    for engine in engines:
        kind, precision = GPU_ENGINES.get(engine, ("cpu", None))
        built = next((a for a in artifacts if a.format == "tensorrt" and a.precision == precision), None)
        if kind == "tensorrt" and built is not None and built.parity is not None:
            out[engine] = {"max_abs_diff": built.parity.max_abs_diff, "top1_agreement": built.parity.top1_agreement}
    return out


def drop_failed_engines(steps: Sequence[dict], engines: Sequence[str],
                        failed: Mapping[str, str]) -> tuple[list[dict], list[str], dict[str, str]]:
    """Steps and engines without the engines that failed on any step (the ledger compares every step on every
    engine), and the failures as skipped-engine reasons."""
    kept = [e for e in engines if e not in failed]
    cleaned = [{**step, "results": {e: r for e, r in step["results"].items() if e in kept},
                "engine_parity": {e: r for e, r in step.get("engine_parity", {}).items() if e in kept}}
               for step in steps]
    return cleaned, kept, {engine: f"failed: {why}" for engine, why in failed.items()}
