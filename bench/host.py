"""The machine a benchmark runs on: its CPU's name and widest SIMD, its cores, and its GPU when one is used."""
from __future__ import annotations

import os
import platform
from pathlib import Path


def cpu_model() -> str:
    """The CPU's name and widest SIMD: numbers from different CPUs are not comparable, so the report names it."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or "unknown CPU"
    name = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), "?")
    simd = "AVX-512" if " avx512f" in info else "AVX2" if " avx2" in info else "no AVX2"
    return f"{name} ({simd})"


def host_description(gpu_target=None) -> str:
    """Platform, CPU and cores; and the GPU of `gpu_target` (runtime.tensorrt.tensorrt_target()) when a run uses one."""
    host = f"{platform.platform()}, {cpu_model()}, {os.cpu_count()} cores"
    if gpu_target is not None:
        host += f", GPU {gpu_target.device_name} (compute capability {gpu_target.compute_capability})"
    return host
