"""The engine factory: a model repository version + engine options -> a loaded Engine of the asked kind."""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass, replace

from runtime.engines.auto import AutoEngine
from runtime.engines.base import Engine, EngineError
from runtime.engines.onnxruntime import OnnxRuntimeEngine, check_onnxruntime_options
from runtime.engines.openvino import OpenVinoEngine, artifact_precision, check_openvino_options
from runtime.engines.tensorrt import (  # imports TensorRT itself only when an engine opens
    check_tensorrt_precision,
    open_tensorrt_engine,
    tensorrt_profile,
)
from runtime.ort_session import (
    ProviderError,
    available_provider,
    cuda_provider_options,
    onnxruntime_version,
    ort_tensorrt_cache_dir,
    tensorrt_provider_options,
)
from runtime.repository import ModelVersion
from runtime.tensorrt import BUILD_LOCK_TIMEOUT_S
from runtime.tensorrt_build import onnx_source_for
from runtime.tensorrt_files import onnx_precision_for
from runtime.tensorrt_runtime import TensorRTError, cudart, import_tensorrt, weakly_typed

# Opening an engine that builds nothing: reading and hashing the version's files, then an ONNX Runtime or OpenVINO
# session, CUDA's start-up on a GPU; engine auto loads two and measures each for auto_measure_s.
OPEN_BOUND_S = 120.0


@dataclass(frozen=True)
class EngineOptions:
    """What to run a version on; the service fills it from its Settings, the bench from its flags."""
    engine: str = "onnxruntime"  # onnxruntime | openvino | tensorrt | auto (the faster fp32 CPU engine, measured)
    provider: str = "cpu"  # ONNX Runtime's: cpu | cuda | tensorrt (OpenVINO refuses a GPU one; TensorRT ignores it)
    precision: str = "fp32"
    max_batch_size: int = 8
    threads: int = 1  # ONNX Runtime intra-op threads / OpenVINO inference threads
    ort_spinning: bool = True
    ort_streams: int = 1  # ONNX Runtime CPU: batches at once on one session, sharing its threads (ort_intra_op_threads)
    openvino_performance_hint: str = "LATENCY"
    repository: str = "models"  # TensorRT: where an engine built on first start is added
    auto_measure_s: float = 2.0  # engine auto: seconds each candidate runs before the choice


def open_engine(version: ModelVersion, options: EngineOptions) -> Engine:
    if options.engine == "tensorrt":
        # A compatible engine from the version, or one built for this GPU on first start (minutes, then cached;
        # one replica builds, the others wait for it); an engine that fails to deserialize is rebuilt once.
        return open_tensorrt_engine(version, options.precision, options.max_batch_size, options.repository)
    return open_engine_unloaded(version, options)


def open_bound_s(engine: str, provider: str) -> float:
    """A bound on opening and loading an engine, its engine calls aside, for a caller that must not wait forever (the
    service's rebuild of a broken engine: a wedged device's load never returns).

    TensorRT may build on the way: open_tensorrt_engine builds an engine when the version (re-read) has none sound for
    this GPU (exported again, a file failing its sha256) and rebuilds one that fails to deserialize, after waiting for
    another replica's build; ONNX Runtime's TensorRT provider builds when its cache lacks one. The bound then allows
    BUILD_LOCK_TIMEOUT_S more, what a replica already allows another's build: a wedged GPU takes that long to be
    given up on, the price of never abandoning a build that would have finished.
    """
    may_build = engine == "tensorrt" or (engine == "onnxruntime" and provider == "tensorrt")
    return OPEN_BOUND_S + (BUILD_LOCK_TIMEOUT_S if may_build else 0.0)


def check_engine_settings(options: EngineOptions) -> str:
    """The precision of the ONNX artifact the engine reads to serve options.precision; EngineError for what it would
    refuse in any version: each engine's own option checks, the provider in this onnxruntime build, OpenVINO or TensorRT
    installed. Needs no version, so `convnext serve` asks it before a download and an export that could take minutes."""
    engine, provider, precision = options.engine, options.provider, options.precision
    if engine == "tensorrt":
        check_tensorrt_precision(precision)
        tensorrt_profile(options.max_batch_size)
        try:
            trt = import_tensorrt()
            cudart()
        except TensorRTError as err:
            raise EngineError(f"--engine tensorrt: {err}") from None
        return onnx_precision_for(precision, weakly_typed(trt))
    if engine == "auto":
        check_auto_options(provider, precision)
        return "fp32"
    if engine == "openvino":
        if importlib.util.find_spec("openvino") is None:
            raise EngineError("--engine openvino needs the openvino package (pip install -e '.[serve]' installs it); "
                              "or use --engine onnxruntime")
        check_openvino_options(provider, options.ort_streams)
        return artifact_precision(precision)  # bf16 runs the fp32 file
    check_onnxruntime_options(provider, precision, options.ort_streams)
    if provider != "cpu":
        try:
            available_provider(provider)
        except ProviderError as err:
            raise EngineError(str(err)) from None
    return precision


def check_engine_options(version: ModelVersion, options: EngineOptions) -> None:
    """Raise EngineError for what open_engine would refuse, without loading a model or touching a GPU: the settings
    (check_engine_settings), then the version's artifact for the precision. `python -m service` runs it before anything
    starts: a wrong flag costs one line, not a model load (or a TensorRT build) first."""
    check_engine_settings(options)
    if options.engine == "tensorrt":
        # The ONNX file TensorRT builds from (on first start; checked even where an engine is there already, as a
        # broken one is rebuilt from it).
        try:
            onnx_source_for(version, options.precision, weakly_typed(import_tensorrt()))
        except TensorRTError as err:
            raise EngineError(f"--engine tensorrt: {err}") from None
        return
    engine = open_engine_unloaded(version, options)
    if isinstance(engine, AutoEngine):
        for candidate in engine.candidates.values():
            candidate()  # each one's own checks


def check_auto_options(provider: str, precision: str) -> None:
    """EngineError unless engine auto can choose: it measures fp32 CPU engines only."""
    if provider != "cpu" or precision != "fp32":
        raise EngineError(f"engine auto chooses between fp32 CPU engines, not provider {provider!r} at precision "
                          f"{precision!r}; on a GPU pass --engine tensorrt or onnxruntime --provider cuda, and for "
                          "bf16/int8 name the engine (--engine openvino --precision bf16)")


def open_engine_unloaded(version: ModelVersion, options: EngineOptions) -> Engine:
    """The engine open_engine would serve, built but not loaded (ONNX Runtime, OpenVINO, auto; not TensorRT, whose
    engine is found or built when it opens)."""
    if options.engine == "openvino":
        return openvino_engine(version, options)
    if options.engine == "auto":
        return auto_engine(version, options)
    return onnxruntime_engine(version, options)


def auto_engine(version: ModelVersion, options: EngineOptions) -> Engine:
    """ONNX Runtime fp32 and OpenVINO fp32 (where it imports) on the CPU; load() measures both and keeps the faster."""
    check_auto_options(options.provider, options.precision)
    candidates = {"onnxruntime": lambda: onnxruntime_engine(version, replace(options, engine="onnxruntime"))}
    if importlib.util.find_spec("openvino") is not None:
        # --ort-streams is ONNX Runtime's; OpenVINO's counterpart is its performance hint, passed as it is.
        candidates["openvino"] = lambda: openvino_engine(version, replace(options, engine="openvino", ort_streams=1))
    return AutoEngine(candidates, options.auto_measure_s)


def _input_shape(version: ModelVersion) -> tuple[int, int, int]:
    spec = version.manifest.input
    return spec.channels, spec.height, spec.width


def _onnx_artifact(version: ModelVersion, precision: str, what: str):
    manifest = version.manifest
    artifact = manifest.find("onnx", precision)
    if artifact is None:
        have = sorted({a.precision for a in manifest.artifacts if a.format == "onnx"})
        raise EngineError(f"{manifest.name}/{manifest.version} has no {precision} ONNX artifact{what} "
                           f"(has {have}); pass --precision one of those")
    return artifact


def ort_intra_op_threads(threads: int, streams: int) -> int:
    """The session's intra_op_num_threads for `streams` batches at once on `threads` threads in all.

    ONNX Runtime's intra-op pool holds intra_op_num_threads - 1 workers and the thread calling Run joins in; one
    session has one pool, so concurrent Runs share its workers, each with its own caller: (n - 1) + streams threads
    work. threads // streams (as before) left cores idle: 8 threads, 2 streams ran 3 workers + 2 callers = 5.
    """
    return max(1, threads - streams + 1)


def onnxruntime_engine(version: ModelVersion, options: EngineOptions) -> Engine:
    """The version's ONNX artifact of the asked precision on ONNX Runtime, with the GPU providers' options."""
    check_onnxruntime_options(options.provider, options.precision, options.ort_streams)  # before the artifact
    manifest, shape = version.manifest, _input_shape(version)
    artifact = _onnx_artifact(version, options.precision, "")
    provider_options = {}
    if options.provider in ("cuda", "tensorrt"):
        provider_options["cuda"] = cuda_provider_options()
    if options.provider == "tensorrt":  # engine + timing caches in the version, so a restart does not rebuild
        cache = ort_tensorrt_cache_dir(version.path, onnxruntime_version())
        provider_options["tensorrt"] = tensorrt_provider_options(cache, manifest.input.name, shape,
                                                                 options.max_batch_size, options.precision)
    return OnnxRuntimeEngine(version.artifact_path(artifact), shape, input_name=manifest.input.name,
                             provider=options.provider, precision=options.precision,
                             max_batch_size=options.max_batch_size,
                             intra_op_threads=ort_intra_op_threads(options.threads, options.ort_streams),
                             spinning=options.ort_spinning, provider_options=provider_options,
                             streams=options.ort_streams)


def openvino_engine(version: ModelVersion, options: EngineOptions) -> Engine:
    """OpenVINO on the CPU: fp32 and bf16 read the fp32 ONNX artifact, int8 the QDQ one. ONNX Runtime's options are
    refused, not ignored (check_openvino_options)."""
    check_openvino_options(options.provider, options.ort_streams)
    artifact = _onnx_artifact(version, artifact_precision(options.precision), f" for OpenVINO {options.precision}")
    return OpenVinoEngine(version.artifact_path(artifact), _input_shape(version),
                          input_name=version.manifest.input.name, precision=options.precision,
                          max_batch_size=options.max_batch_size, threads=options.threads,
                          performance_hint=options.openvino_performance_hint)
