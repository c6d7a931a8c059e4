"""The machine a benchmark runs on: its CPU's name and widest SIMD, its cores, and its GPU when one is used."""
from __future__ import annotations

import os
import platform
from pathlib import Path

from convnext_common import usable_cpus


def cpu_model() -> str:
    """The CPU's name and widest SIMD: numbers from different CPUs are not comparable, so the report names it."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or "unknown CPU"
    name = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), "?")
    simd = "AVX-512" if " avx512f" in info else "AVX2" if " avx2" in info else "no AVX2"
    return f"{name} ({simd})"


def cores_description() -> str:
    """The cores this process may run on (its affinity mask: taskset, a container's cpuset), as the service counts
    them for its threads, and the machine's count beside them when the mask leaves some out."""
    usable, machine = usable_cpus(), os.cpu_count() or 1
    return f"{usable} cores" if usable >= machine else f"{usable} usable of {machine} cores"


def host_description(gpu_target=None) -> str:
    """Platform, CPU and cores; and the GPU of `gpu_target` (runtime.tensorrt.tensorrt_target()) when a run uses one."""
    host = f"{platform.platform()}, {cpu_model()}, {cores_description()}"
    if gpu_target is not None:
        host += f", GPU {gpu_target.device_name} (compute capability {gpu_target.compute_capability})"
    return host
