"""What each step of scripts/gpu_check.sh needs that this Python lacks, for its no-install mode (--python PY): such a
step is reported NOT RUN with the packages named, instead of failing on an ImportError, and pytest-gpu runs the
tests/gpu files this Python can. Standard library only: it runs in whatever interpreter it is given.

    python scripts/gpu_check_needs.py    # per line: step NAME<TAB>missing packages, or test PATH<TAB>missing packages
"""
from __future__ import annotations

import importlib.util
from collections.abc import Callable


def importable(module: str) -> Callable[[], bool]:
    def check() -> bool:
        try:
            return importlib.util.find_spec(module) is not None
        except ImportError:  # a dotted name imports its parents: no `cuda` for `cuda.bindings`
            return False

    return check


def onnxruntime_cuda() -> bool:
    """onnxruntime-gpu: the CPU onnxruntime has no CUDAExecutionProvider (and create_session refuses a GPU session
    on it)."""
    try:
        import onnxruntime
    except ImportError:
        return False
    return "CUDAExecutionProvider" in onnxruntime.get_available_providers()


def torch_cuda() -> bool:
    """A CUDA build of torch that sees a GPU: on a CPU build `python -m training` would quietly train on the CPU."""
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


# A pip package a NOT RUN line names -> the module it installs, which this Python has when it finds it
# (tests/deploy/test_gpu_check_python.py holds each step's list to what its entry module really imports).
PACKAGE_MODULES = {
    "numpy": "numpy",
    "pillow": "PIL",
    "pydantic": "pydantic",  # the model repository's manifest schema (runtime/repository.py)
    "pydantic-settings": "pydantic_settings",
    "prometheus-client": "prometheus_client",
    "threadpoolctl": "threadpoolctl",  # bench/cpu_engines.py, which `python -m bench` imports (scikit-learn's too)
    "torch": "torch",
    "torchvision": "torchvision",
    "timm": "timm",
    "scikit-learn": "sklearn",
    "scikit-image": "skimage",
    "onnx": "onnx",
    "onnxscript": "onnxscript",
    "onnxconverter-common": "onnxconverter_common",
    "ml_dtypes": "ml_dtypes",
    "onnxruntime": "onnxruntime",
    "matplotlib": "matplotlib",
    "pytest": "pytest",
    "tensorrt-cu13": "tensorrt",
    "cuda-python": "cuda.bindings",
}
# What a NOT RUN line names (a pip package, or what is wrong with one) -> whether this Python has it.
CHECKS: dict[str, Callable[[], bool]] = {
    **{package: importable(module) for package, module in PACKAGE_MODULES.items()},
    "onnxruntime-gpu (CUDAExecutionProvider)": onnxruntime_cuda,
    "torch with CUDA (torch.cuda.is_available())": torch_cuda,
}
# A need that says nothing more once another is missing: no torch means no CUDA torch.
IMPLIED = {"torch with CUDA (torch.cuda.is_available())": "torch"}

RUNTIME = ("numpy", "pillow", "pydantic")  # runtime/ and every CLI that reads the model repository
EXPORT = RUNTIME + ("torch", "torchvision", "onnx", "onnxscript", "onnxconverter-common", "ml_dtypes", "onnxruntime")
TENSORRT = RUNTIME + ("tensorrt-cu13", "cuda-python", "ml_dtypes", "onnxruntime")
ORT_CUDA = RUNTIME + ("onnxruntime-gpu (CUDAExecutionProvider)",)
TORCH_CUDA = ("numpy", "torch", "torch with CUDA (torch.cuda.is_available())")
BENCH = ("prometheus-client", "threadpoolctl")  # what `python -m bench` imports besides the runtime
ROADMAP = EXPORT + TENSORRT + ORT_CUDA + BENCH + ("matplotlib",)
STEP_NEEDS: dict[str, tuple[str, ...]] = {
    "doctor": RUNTIME + ("pydantic-settings", "cuda-python"),  # --require gpu: the driver and GPU via cuda.bindings
    "export": EXPORT,
    "tensorrt-fp32": TENSORRT,
    "tensorrt-fp16": TENSORRT,
    "tensorrt-bf16": TENSORRT,
    "ort-cuda": ORT_CUDA,
    "train-amp": TORCH_CUDA + ("pillow", "torchvision", "timm", "scikit-learn"),
    "pytest-gpu": ("pytest",),  # and, per file, GPU_TEST_NEEDS
    "bench": ORT_CUDA + BENCH,
    "roadmap": ROADMAP,
}
# Every tests/gpu file (tests/deploy/test_gpu_check_python.py checks that none is missing): what its tests import.
GPU_TEST_NEEDS: dict[str, tuple[str, ...]] = {
    "tests/gpu/test_training_rng_gpu.py": TORCH_CUDA + ("torchvision",),  # training.checkpoint imports model/
    "tests/gpu/test_service_engines_gpu.py": EXPORT + TENSORRT + ORT_CUDA,
    "tests/gpu/test_tensorrt_export.py": EXPORT + TENSORRT + ("scikit-learn", "scikit-image"),
    "tests/gpu/test_roadmap_gpu_bench.py": ROADMAP,
}


def missing(needs: tuple[str, ...], have: dict[str, bool]) -> list[str]:
    """The needs `have` says are absent, once each, in order, less those another missing one implies."""
    absent = [need for need in dict.fromkeys(needs) if not have[need]]
    return [need for need in absent if IMPLIED.get(need) not in absent]


def main() -> int:
    have = {name: check() for name, check in CHECKS.items()}  # each once: importing torch takes seconds
    for kind, table in (("step", STEP_NEEDS), ("test", GPU_TEST_NEEDS)):
        for name, needs in table.items():
            print(f"{kind}\t{name}\t{', '.join(missing(needs, have))}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
