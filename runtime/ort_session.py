"""ONNX Runtime sessions on a named execution provider, refused when ORT quietly loaded another one (no torch)."""
from __future__ import annotations

import contextlib
import functools
import sys
from collections.abc import Mapping
from pathlib import Path

# The one table of execution providers in the code base: the short names the CLIs, settings and bench take.
PROVIDERS = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
}
# Nodes a provider cannot take run on the next one in the chain (TensorRT -> CUDA -> CPU): a placement, not a fallback.
PROVIDER_CHAINS = {
    "cpu": ("cpu",),
    "cuda": ("cuda", "cpu"),
    "tensorrt": ("tensorrt", "cuda", "cpu"),
}
# What the GPU providers load at session creation (readelf -d of onnxruntime-gpu 1.31.1's provider libraries): the
# CUDA provider needs cudart, cuBLAS(Lt) and curand of the CUDA major it was built for, and cuDNN 9; the TensorRT one
# also libnvinfer.so.10, i.e. TensorRT 10: a TensorRT 11 install does not satisfy it.
TENSORRT_FOR_ORT = "TensorRT 10 (libnvinfer.so.10)"
ORT_TRT_CACHE_FOLDER = Path("engines") / "ort-trt"  # inside a model version, beside the native TensorRT engines


class ProviderError(RuntimeError):
    """ONNX Runtime could not create a session on the execution provider asked for."""


def provider_name(provider: str) -> str:
    """'cuda' -> 'CUDAExecutionProvider'; a clear error for a name outside the table."""
    if provider not in PROVIDERS:
        raise ValueError(f"provider {provider!r}: choose from {sorted(PROVIDERS)}")
    return PROVIDERS[provider]


def provider_key(name: str) -> str:
    """'CUDAExecutionProvider' -> 'cuda' (the reverse of provider_name)."""
    for key, full in PROVIDERS.items():
        if full == name:
            return key
    raise ValueError(f"execution provider {name!r} is not one of {sorted(PROVIDERS.values())}")


def cuda_provider_options(device_id: int = 0) -> dict[str, str]:
    """CUDA execution provider options, as the strings ONNX Runtime parses (CUDA EP docs, "Configuration Options")."""
    return {
        "device_id": str(device_id),
        # cuDNN benchmarks every algorithm once per input shape and keeps the fastest (the documented default,
        # spelled out): batch sizes warmup did not run pay it on their first batch only.
        "cudnn_conv_algo_search": "EXHAUSTIVE",
        # The provider runs fp32 matmuls and convolutions in TF32 on Ampere and newer unless told not to (its
        # use_tf32 defaults to 1): off, so an fp32 artifact runs in fp32, as the native TensorRT fp32 engines do.
        "use_tf32": "0",
    }


def ort_tensorrt_cache_dir(version_path: str | Path, ort_version: str) -> Path:
    """Where ORT's TensorRT provider keeps its engine and timing caches for one model version.

    Named by the ONNX Runtime release: its docs say the caches are invalid once ORT or TensorRT changes, and each ORT
    release links one TensorRT major. Engine files carry the GPU architecture in their names (`..._sm90.engine`).
    """
    return Path(version_path) / ORT_TRT_CACHE_FOLDER / f"ort-{ort_version}"


def shape_string(input_name: str, batch: int, input_shape: tuple[int, int, int]) -> str:
    """'input:8x3x224x224', the trtexec-like format of trt_profile_*_shapes."""
    return f"{input_name}:" + "x".join(str(d) for d in (batch, *input_shape))


def tensorrt_provider_options(cache_dir: str | Path, input_name: str, input_shape: tuple[int, int, int],
                              max_batch_size: int, precision: str, device_id: int = 0) -> dict[str, str]:
    """TensorRT execution provider options: cached engine + timing cache, one profile over batch 1..max_batch_size.

    Without an explicit profile ORT builds an engine for the first shape it sees and rebuilds on every new batch
    size; with the caches off it rebuilds on every start (minutes for ConvNeXt-T).
    """
    if max_batch_size < 1:
        raise ValueError(f"max_batch_size {max_batch_size} must be at least 1")
    cache = str(cache_dir)
    return {
        "device_id": str(device_id),
        "trt_engine_cache_enable": "True",
        "trt_engine_cache_path": cache,
        "trt_timing_cache_enable": "True",
        "trt_timing_cache_path": cache,
        # fp16 lets TensorRT pick fp16 kernels; LayerNorm's Pow + ReduceMean then overflow in fp16, so ORT keeps
        # those in fp32. int8 artifacts are Q/DQ graphs (explicit quantization); ORT builds a weakly typed network,
        # for which TensorRT's quantization guide (8.x) says the INT8 builder flag must be set; trt_int8_enable sets
        # it (TensorRT 10's guide drops the need for strongly typed networks only). With no calibration table named,
        # ORT reads none: the Q/DQ scales are the calibration. Never run here (no machine here has libnvinfer).
        "trt_fp16_enable": str(precision == "fp16"),
        "trt_layer_norm_fp32_fallback": str(precision == "fp16"),
        "trt_bf16_enable": str(precision == "bf16"),
        "trt_int8_enable": str(precision == "int8"),
        # opt = max, as the native engines' profile: under load the batcher fills whole batches.
        "trt_profile_min_shapes": shape_string(input_name, 1, input_shape),
        "trt_profile_opt_shapes": shape_string(input_name, max_batch_size, input_shape),
        "trt_profile_max_shapes": shape_string(input_name, max_batch_size, input_shape),
    }


def onnxruntime_version() -> str:
    import onnxruntime as ort

    return ort.__version__


def _what_to_check(provider: str, ort) -> str:
    build = getattr(ort.capi, "build_and_package_info", None)
    cuda = getattr(build, "cuda_version", None) or "12 or 13"
    libraries = f"the CUDA {cuda.split('.')[0]} runtime, cuBLAS and cuDNN 9 libraries"
    if provider == "tensorrt":
        libraries = f"{TENSORRT_FOR_ORT} and {libraries}"
    return (f"check the NVIDIA driver (`nvidia-smi`), that {libraries} (what onnxruntime-gpu {ort.__version__} is "
            "built for) are installed and on the library path, and run `python -m service doctor`; or use "
            "--provider cpu")


def provider_chain(provider: str, provider_options: Mapping[str, Mapping[str, str]] | None = None) -> list:
    """The `providers` argument of InferenceSession: names, with (name, options) where options are given."""
    options = provider_options or {}
    return [(provider_name(key), dict(options[key])) if key in options else provider_name(key)
            for key in PROVIDER_CHAINS[provider]]


def available_provider(provider: str) -> str:
    """The ORT name of `provider` when this onnxruntime build has it; ProviderError saying how to get it if not."""
    import onnxruntime as ort

    wanted = provider_name(provider)
    available = ort.get_available_providers()
    if wanted not in available:
        raise ProviderError(f"{wanted} is not in this onnxruntime build (onnxruntime {ort.__version__} has "
                            f"{available}); on an NVIDIA GPU host: pip uninstall -y onnxruntime onnxruntime-gpu && "
                            "pip install "
                            "'onnxruntime-gpu[cuda,cudnn]==1.31.1' (the two packages overwrite each other; or use the "
                            "GPU image), then python -m service doctor; or use --provider cpu")
    return wanted


@functools.cache
def preload_cuda_libraries() -> None:
    """Load the CUDA and cuDNN libraries of the nvidia-* wheels (site-packages/nvidia/cu13/lib, nvidia/cudnn/lib)
    before a GPU session: onnxruntime-gpu's CUDA provider opens them by name and has no RUNPATH, so in a venv without
    LD_LIBRARY_PATH it would not load. `onnxruntime.preload_dlls(directory="")` (ORT docs, "Preload DLLs") looks in
    those wheels first, then the loader's default paths; in the GPU image, whose LD_LIBRARY_PATH names the same
    folders, it loads the same files. Once per process. It prints what it cannot load: sent to stderr, so a JSON
    report on stdout stays JSON; the session then fails and says what to check. A CPU build has nothing to load."""
    import onnxruntime as ort

    if getattr(ort.capi.build_and_package_info, "cuda_version", "") and hasattr(ort, "preload_dlls"):
        with contextlib.redirect_stdout(sys.stderr):
            ort.preload_dlls(directory="")


def create_session(model_path: str | Path, provider: str = "cpu", options=None,
                   provider_options: Mapping[str, Mapping[str, str]] | None = None):
    """An InferenceSession whose first provider is `provider`, or ProviderError saying why and what to check.

    `provider_options` maps short names ("tensorrt", "cuda") to their option dicts. ONNX Runtime silently drops
    a GPU provider whose libraries fail to load and runs on CPU; it may also retry a failed session or run on
    CPU. Both are refused here: fallback is off at creation and at run, and the loaded providers are checked.
    """
    import onnxruntime as ort

    wanted = available_provider(provider)
    if provider != "cpu":
        preload_cuda_libraries()
    for key in ("trt_engine_cache_path", "trt_timing_cache_path"):
        folder = (provider_options or {}).get("tensorrt", {}).get(key)
        if folder:
            try:
                Path(folder).mkdir(parents=True, exist_ok=True)
            except OSError as err:
                raise ProviderError(f"cannot create the TensorRT cache folder {folder} ({err.strerror}); the model "
                                    "repository must be writable for ONNX Runtime's TensorRT provider") from None
    chain = provider_chain(provider, provider_options)
    try:
        # enable_fallback=0: a failing provider raises instead of ORT retrying the session on CPU.
        session = ort.InferenceSession(str(model_path), sess_options=options, providers=chain, enable_fallback=0)
    except Exception as err:  # onnxruntime's pybind errors derive from Exception only
        hint = "" if provider == "cpu" else f"; {_what_to_check(provider, ort)}"
        raise ProviderError(f"ONNX Runtime could not load {model_path} on {wanted}: {str(err).strip()}{hint}") from err
    loaded = session.get_providers()
    missing = [provider_name(k) for k in PROVIDER_CHAINS[provider] if provider_name(k) not in loaded]
    if not loaded or loaded[0] != wanted or missing:
        raise ProviderError(f"asked ONNX Runtime for {wanted} but it loaded {loaded} (the libraries of "
                            f"{', '.join(missing) or wanted} failed to load; ONNX Runtime's log above says which); "
                            f"{_what_to_check(provider, ort)}")
    session.disable_fallback()  # a provider failing inside run() raises instead of re-running the batch on CPU
    return session
