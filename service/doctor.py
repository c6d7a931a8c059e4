"""`python -m service doctor`: can this host serve on its GPU? Driver, CUDA, cuDNN, TensorRT, the providers that load.

Every check is run for real: ONNX Runtime sessions are created on a tiny committed model with one provider each
and `session.get_providers()` says which one actually runs (ONNX Runtime falls back to CPU silently); TensorRT
builds, deserializes and runs a one-layer engine. Exit status 1 when a required check fails, with the reason and
the fix on its line. Torch-free; TensorRT, cuda-python and onnxruntime are imported only inside their checks.
"""
from __future__ import annotations

import contextlib
import ctypes
import importlib.metadata
import io
import json
import re
import shutil
import subprocess
import sys
import sysconfig
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from convnext_common import CliParser, add_version_argument, exit_status, prog_name
from runtime.ort_session import preload_cuda_libraries
from runtime.tensorrt_runtime import stream_handle

PROG = "python -m service doctor"  # as the module runs; prog_name() gives it as the user ran it

# CUDA 13.x runs on NVIDIA drivers >= 580 (docs.nvidia.com/deploy/cuda-compatibility, "Minor Version
# Compatibility", table 1); cudaDriverGetVersion reports 13000 for such a driver.
MIN_DRIVER_MAJOR = 580
MIN_DRIVER_CUDA = 13000
# CUDA 13 dropped offline compilation for Maxwell, Pascal and Volta: Turing (7.5) is the oldest GPU it serves.
MIN_COMPUTE_CAPABILITY = (7, 5)
# y = 2x, x: float32[1, 4], through a 1x1 convolution: on the CUDA provider that runs cuDNN, which the provider opens
# only when a node needs it (a model of one Add would pass without cuDNN, and serving would fail at its warm-up).
TINY_MODEL = Path(__file__).parent / "assets" / "doctor_double.onnx"
REQUIREMENTS = ("gpu", "tensorrt", "cuda", "ort-tensorrt")
ORT_PROVIDERS = {"cuda": "CUDAExecutionProvider", "ort-tensorrt": "TensorrtExecutionProvider"}
# What onnxruntime-gpu 1.31.1's CUDA provider links (readelf -d: no cuFFT, though its [cuda] extra installs it),
# plus cuDNN, which it dlopens.
CUDA_LIBRARIES = ("libcuda.so.1", "libcudart.so.13", "libcublasLt.so.13", "libcublas.so.13", "libcurand.so.10",
                  "libcudnn.so.9")
NVIDIA_WHEEL_LIB_DIRS = ("nvidia/cu13/lib", "nvidia/cudnn/lib")  # where the nvidia-* CUDA 13 wheels put them
ORT_GPU_INSTALL = "pip uninstall -y onnxruntime onnxruntime-gpu && pip install 'onnxruntime-gpu[cuda,cudnn]==1.31.1'"
GPU_INSTALL = ("in a venv without the CPU onnxruntime: pip install -e '.[serve,gpu]' --extra-index-url "
               "https://pypi.nvidia.com (onnxruntime-gpu[cuda,cudnn], tensorrt-cu13 whose libraries come from that "
               "index, cuda-python), or use the GPU image (docker compose up)")
NO_DRIVER_FIX = (f"install NVIDIA driver >= {MIN_DRIVER_MAJOR} on the host; in a container also install the NVIDIA "
                 "Container Toolkit on the host and give the container a GPU (docker run --gpus all, or compose's "
                 "deploy.resources.reservations.devices)")


@dataclass
class Check:
    name: str
    ok: bool
    detail: str
    required: bool = False
    fix: str = ""


class CheckFailed(Exception):
    """A check's clear failure: what is wrong and what to do."""

    def __init__(self, detail: str, fix: str = ""):
        super().__init__(detail)
        self.detail, self.fix = detail, fix


def requirements_for(engine: str, provider: str) -> set[str]:
    """What serving with these settings needs from the host (nothing for ONNX Runtime on CPU)."""
    if engine == "tensorrt":
        return {"gpu", "tensorrt"}
    if provider == "cuda":
        return {"gpu", "cuda"}
    if provider == "tensorrt":
        return {"gpu", "ort-tensorrt"}
    return set()


def installed_version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def check_packages() -> str:
    names = ("onnxruntime", "onnxruntime-gpu", "tensorrt-cu13", "tensorrt-cu13-libs", "cuda-python", "cuda-bindings",
             "nvidia-cuda-runtime", "nvidia-cudnn-cu13")
    found = {name: installed_version(name) for name in names}
    if found["onnxruntime"] and found["onnxruntime-gpu"]:
        raise CheckFailed(f"both onnxruntime {found['onnxruntime']} and onnxruntime-gpu {found['onnxruntime-gpu']} "
                          "are installed: they write the same onnxruntime/ folder, and the GPU providers usually "
                          "disappear", ORT_GPU_INSTALL)
    return ", ".join(f"{name} {version}" for name, version in found.items() if version) or "none of them"


def _cudart():
    try:
        from cuda.bindings import runtime
    except ImportError as error:
        raise CheckFailed(f"cuda-python is not installed ({error})",
                          "pip install 'cuda-python==13.4.4' (gpu extra)") from error
    return runtime


def _cuda(result):
    """cuda-python returns (error, *values): raise CheckFailed on an error, else the value(s)."""
    error, *values = result
    if int(error) != 0:
        raise CheckFailed(f"CUDA call failed: {error}", NO_DRIVER_FIX)
    return values[0] if len(values) == 1 else tuple(values)


def driver_version_text() -> str | None:
    """The kernel module's version, e.g. '580.82.07', from /proc or nvidia-smi; None when neither has it."""
    with contextlib.suppress(OSError):
        match = re.search(r"Kernel Module\s+(?:for \S+\s+)?(\d+\.\d+(?:\.\d+)?)",
                          Path("/proc/driver/nvidia/version").read_text())
        if match:
            return match.group(1)
    if shutil.which("nvidia-smi"):
        result = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                capture_output=True, text=True, timeout=30, check=False)
        if result.returncode == 0 and result.stdout.strip():
            return result.stdout.split()[0]
    return None


def check_driver() -> str:
    cudart = _cudart()
    driver_cuda = _cuda(cudart.cudaDriverGetVersion())
    text = driver_version_text()
    if driver_cuda == 0:
        raise CheckFailed("no NVIDIA driver is visible (libcuda.so.1 is not loadable)", NO_DRIVER_FIX)
    described = f"driver {text or '?'} (supports CUDA {driver_cuda // 1000}.{driver_cuda % 1000 // 10})"
    major = int(text.split(".")[0]) if text else None
    if driver_cuda < MIN_DRIVER_CUDA or (major is not None and major < MIN_DRIVER_MAJOR):
        raise CheckFailed(f"{described} is too old: CUDA 13 needs driver >= {MIN_DRIVER_MAJOR}",
                          f"upgrade the NVIDIA driver to >= {MIN_DRIVER_MAJOR}")
    return described


def check_cuda_runtime() -> str:
    cudart = _cudart()
    runtime = _cuda(cudart.cudaRuntimeGetVersion())
    wheel = installed_version("nvidia-cuda-runtime")
    return (f"cuda-python runtime {runtime // 1000}.{runtime % 1000 // 10} (cuda-bindings "
            f"{installed_version('cuda-bindings')}); libcudart for ONNX Runtime: "
            + (f"nvidia-cuda-runtime {wheel}" if wheel else "no nvidia-cuda-runtime wheel"))


def check_gpu() -> str:
    cudart = _cudart()
    count = _cuda(cudart.cudaGetDeviceCount())
    if count == 0:
        raise CheckFailed("the driver sees no GPU", NO_DRIVER_FIX)
    props = _cuda(cudart.cudaGetDeviceProperties(0))
    name = props.name.decode(errors="replace").rstrip("\x00") if isinstance(props.name, bytes) else str(props.name)
    described = (f"{count} GPU(s); device 0: {name}, compute capability {props.major}.{props.minor}, "
                 f"{props.totalGlobalMem / 2**30:.1f} GiB")
    if (props.major, props.minor) < MIN_COMPUTE_CAPABILITY:
        raise CheckFailed(f"{described}: CUDA 13 needs compute capability >= 7.5 (Turing or newer)",
                          "use a Turing or newer GPU")
    return described


def check_cuda_libraries() -> str:
    """Which CUDA libraries the dynamic loader finds by name, the way ONNX Runtime's providers look them up."""
    missing = [soname for soname in CUDA_LIBRARIES if not _loadable(soname)]
    if not missing:
        return "all found: " + ", ".join(CUDA_LIBRARIES)
    site = Path(sysconfig.get_paths()["purelib"])
    wheel_dirs = [str(site / d) for d in NVIDIA_WHEEL_LIB_DIRS if (site / d).is_dir()]
    fix = "libcuda.so.1 comes with the NVIDIA driver (see 'driver')" if "libcuda.so.1" in missing else ""
    if wheel_dirs and any((Path(d) / s).is_file() for d in wheel_dirs for s in missing):
        fix = (fix + "; " if fix else "") + "the CUDA wheels are installed but not on the loader path: export " \
              f"LD_LIBRARY_PATH={':'.join(wheel_dirs)}${{LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}} (the image sets it)"
    raise CheckFailed("not loadable: " + ", ".join(missing), fix or "pip install 'onnxruntime-gpu[cuda,cudnn]'")


def check_cudnn() -> str:
    try:
        cudnn = ctypes.CDLL("libcudnn.so.9")
    except OSError:
        wheel = installed_version("nvidia-cudnn-cu13")
        raise CheckFailed("libcudnn.so.9 is not loadable" + (f" (nvidia-cudnn-cu13 {wheel} is installed)"
                                                             if wheel else ""),
                          "pip install 'onnxruntime-gpu[cuda,cudnn]' and see 'cuda libraries'") from None
    cudnn.cudnnGetVersion.restype = ctypes.c_size_t
    version = cudnn.cudnnGetVersion()  # cuDNN 9: major * 10000 + minor * 100 + patch
    return f"cuDNN {version // 10000}.{version % 10000 // 100}.{version % 100}"


def check_onnxruntime() -> str:
    try:
        import onnxruntime as ort
    except ImportError as error:
        raise CheckFailed(f"onnxruntime is not installed ({error})", GPU_INSTALL) from error
    build = "onnxruntime-gpu" if installed_version("onnxruntime-gpu") else "onnxruntime (CPU build)"
    return f"{build} {ort.__version__}; providers in this build: {', '.join(ort.get_available_providers())}"


def check_ort_provider(provider: str) -> str:
    """A real session on the tiny model with only `provider`; which provider runs it is the answer."""
    import onnxruntime as ort

    if provider not in ort.get_available_providers():
        raise CheckFailed(f"{provider} is not in this onnxruntime build (it has {ort.get_available_providers()})",
                          ORT_GPU_INSTALL)
    # ONNX Runtime prints its fallback notice to stdout; keep stdout for this report (and --json). enable_fallback=0:
    # a provider that fails inside run() (the TensorRT provider's EP_FAIL) raises rather than ORT printing "Falling
    # back to ['CPUExecutionProvider'] and retrying" and answering from the CPU, which this check would call a pass.
    with contextlib.redirect_stdout(io.StringIO()):
        session = ort.InferenceSession(str(TINY_MODEL), providers=[provider], enable_fallback=0)
    running = session.get_providers()
    problem = fallback_problem(provider, running)
    if problem:
        raise CheckFailed(problem, _provider_fix(provider))
    x = np.arange(4, dtype=np.float32).reshape(1, 4)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            (y,) = session.run(None, {"x": x})
    except Exception as err:  # onnxruntime's pybind errors derive from Exception only
        raise CheckFailed(f"{provider} loads but failed to run the tiny model: {str(err).strip()}",
                          _provider_fix(provider)) from None
    if not np.array_equal(y, 2 * x):
        raise CheckFailed(f"{provider} ran the tiny model but returned {y.tolist()}, not {(2 * x).tolist()}")
    return f"loads and runs (session providers: {', '.join(running)})"


def fallback_problem(provider: str, running: list[str]) -> str | None:
    """ONNX Runtime quietly retries on the next provider when one fails to load: the first one running must be ours."""
    if running[0] != provider:
        return f"{provider} is in this build but did not load: ONNX Runtime fell back to {running[0]}"
    return None


def _provider_fix(provider: str) -> str:
    if provider == "TensorrtExecutionProvider" and not _loadable("libnvinfer.so.10"):
        return ("onnxruntime-gpu 1.31.1's TensorRT provider links TensorRT 10 (libnvinfer.so.10, not loadable "
                "here) and the gpu extra installs TensorRT 11: serve with --engine tensorrt (native TensorRT) or "
                "--provider cuda")
    return "see 'driver' and 'cuda libraries' above for what is missing"


def _loadable(soname: str) -> bool:
    try:
        ctypes.CDLL(soname)
    except OSError:
        return False
    return True


def check_tensorrt() -> str:
    try:
        import tensorrt as trt
    except ImportError as error:
        raise CheckFailed(f"TensorRT is not installed ({error})", GPU_INSTALL) from error
    return f"TensorRT {trt.__version__} (tensorrt-cu13-libs {installed_version('tensorrt-cu13-libs') or '?'})"


def check_tensorrt_engine() -> str:
    """Build a one-layer engine (y = x + x), deserialize it and run it on the GPU with cuda-python."""
    import tensorrt as trt

    cudart = _cudart()
    logger = trt.Logger(trt.Logger.ERROR)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # TensorRT 11 is always strongly typed; 10 builds this fp32 layer as is
    x = network.add_input("x", trt.float32, (1, 4))
    doubled = network.add_elementwise(x, x, trt.ElementWiseOperation.SUM)
    doubled.get_output(0).name = "y"
    network.mark_output(doubled.get_output(0))
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, 1 << 24)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise CheckFailed("TensorRT could not build a one-layer engine on this GPU")
    engine = trt.Runtime(logger).deserialize_cuda_engine(serialized)
    if engine is None:
        raise CheckFailed("TensorRT could not deserialize the engine it just built")
    context = engine.create_execution_context()
    host_in = np.arange(4, dtype=np.float32).reshape(1, 4)
    host_out = np.empty_like(host_in)
    kind = cudart.cudaMemcpyKind
    stream, device = None, []  # whatever was created is freed, even when a later allocation fails
    try:
        stream = _cuda(cudart.cudaStreamCreate())
        device_in = _cuda(cudart.cudaMalloc(host_in.nbytes))
        device.append(device_in)
        device_out = _cuda(cudart.cudaMalloc(host_out.nbytes))
        device.append(device_out)
        _cuda(cudart.cudaMemcpy(device_in, host_in.ctypes.data, host_in.nbytes, kind.cudaMemcpyHostToDevice))
        if not (context.set_tensor_address("x", int(device_in)) and context.set_tensor_address("y", int(device_out))):
            raise CheckFailed("TensorRT refused the device buffers' addresses for the one-layer engine")
        if not context.execute_async_v3(stream_handle(stream)):
            raise CheckFailed("TensorRT execute_async_v3 failed on the one-layer engine")
        _cuda(cudart.cudaStreamSynchronize(stream))
        _cuda(cudart.cudaMemcpy(host_out.ctypes.data, device_out, host_out.nbytes, kind.cudaMemcpyDeviceToHost))
    finally:
        for pointer in device:
            cudart.cudaFree(pointer)
        if stream is not None:
            cudart.cudaStreamDestroy(stream)
    if not np.array_equal(host_out, 2 * host_in):
        raise CheckFailed(f"the one-layer engine returned {host_out.tolist()}, not {(2 * host_in).tolist()}")
    return f"built, deserialized and ran a one-layer engine ({len(bytes(serialized))} bytes)"


def run_checks(required: set[str]) -> list[Check]:
    """Every check, in order; a check whose prerequisite failed is reported as not run, with that reason."""
    gpu_needed = bool(required)
    ort_gpu = "cuda" in required or "ort-tensorrt" in required  # a GPU provider of ONNX Runtime: CUDA and cuDNN
    plan = [
        ("packages", check_packages, "cuda" in required or "ort-tensorrt" in required, None),
        ("driver", check_driver, gpu_needed, None),
        ("cuda runtime", check_cuda_runtime, False, None),
        ("gpu", check_gpu, gpu_needed, "driver"),
        ("cuda libraries", check_cuda_libraries, ort_gpu, None),
        ("cudnn", check_cudnn, ort_gpu, None),
        ("onnxruntime", check_onnxruntime, "cuda" in required or "ort-tensorrt" in required, None),
        ("ort CUDAExecutionProvider", lambda: check_ort_provider("CUDAExecutionProvider"), "cuda" in required,
         "onnxruntime"),
        ("ort TensorrtExecutionProvider", lambda: check_ort_provider("TensorrtExecutionProvider"),
         "ort-tensorrt" in required, "onnxruntime"),
        ("tensorrt", check_tensorrt, "tensorrt" in required, None),
        ("tensorrt engine", check_tensorrt_engine, "tensorrt" in required, "tensorrt+gpu"),
    ]
    results: dict[str, Check] = {}
    for name, check, is_required, prerequisite in plan:
        failed_before = [p for p in (prerequisite or "").split("+") if p and not results[p].ok]
        if failed_before:
            results[name] = Check(name, False, f"not run: '{failed_before[0]}' failed", is_required)
            continue
        try:
            results[name] = Check(name, True, check(), is_required)
        except CheckFailed as failure:
            results[name] = Check(name, False, failure.detail, is_required, failure.fix)
        except Exception as error:  # a vendor library's own error type: report it as this check's failure
            results[name] = Check(name, False, f"{type(error).__name__}: {error}", is_required)
    return list(results.values())


def format_report(checks: list[Check], required: set[str]) -> str:
    lines = [f"convnext doctor (required: {', '.join(sorted(required)) or 'nothing: CPU serving'})"]
    for check in checks:
        mark = "ok  " if check.ok else "FAIL" if check.required else "--  "
        lines.append(f"{mark} {check.name:<30} {check.detail}")
        if not check.ok and check.fix:
            lines.append(f"{'':<36}fix: {check.fix}")
    failed = [c.name for c in checks if c.required and not c.ok]
    lines.append(f"host check FAILED: {', '.join(failed)}" if failed else "host check passed")
    return "\n".join(lines)


def get_args_parser() -> CliParser:
    parser = CliParser(prog=PROG, description=__doc__.splitlines()[0])
    add_version_argument(parser)
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument("--require", default=None,
                        help=f"comma-separated subset of {','.join(REQUIREMENTS)} (default: gpu,tensorrt,cuda)")
    parser.add_argument("--engine", choices=("onnxruntime", "tensorrt", "openvino", "auto"), default=None,
                        help="require what serving with this engine needs (with --provider; openvino and auto run "
                             "on the CPU and need nothing from the host)")
    parser.add_argument("--provider", choices=("cpu", "cuda", "tensorrt"), default="cpu")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(sys.argv[1:] if argv is None else argv)
    if args.engine is not None:
        required = requirements_for(args.engine, args.provider)
    else:
        required = set((args.require or "gpu,tensorrt,cuda").split(",")) - {""}
        unknown = required - set(REQUIREMENTS)
        if unknown:
            print(f"{prog_name(PROG)}: error: unknown requirement(s) {sorted(unknown)}; choose from {REQUIREMENTS}",
                  file=sys.stderr)
            return 2
    with contextlib.suppress(ImportError):
        import onnxruntime

        onnxruntime.set_default_logger_severity(4)  # failures are explained in the report, not in ORT's log
        # As the service does before a GPU session: the nvidia-* wheels' libraries first. What it cannot load, the
        # checks below report; its own lines would only repeat them.
        with contextlib.redirect_stderr(io.StringIO()):
            preload_cuda_libraries()
    checks = run_checks(required)
    ok = all(c.ok for c in checks if c.required)
    if args.json:
        print(json.dumps({"ok": ok, "required": sorted(required), "checks": [asdict(c) for c in checks]}, indent=2))
    else:
        print(format_report(checks, required))
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(exit_status(main))
