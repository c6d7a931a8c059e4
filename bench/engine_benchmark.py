"""ONNX Runtime images/s and p50/p99 latency vs batch size, and the GELU-vs-ReLU / ConvNeXt-T-vs-ResNet-50 comparison.

Models are exported with random weights into a temporary repository: speed does not depend on the weights, so the
comparison is fair, but nothing here measures accuracy (the top-1 numbers in PUBLISHED_TOP1 are the papers').
"""
from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from convnext_common import usable_cpus
from export.onnx import export_onnx_version
from runtime.engines.tensorrt import TensorRTEngine
from runtime.ort_session import (
    available_provider,
    create_session,
    cuda_provider_options,
    onnxruntime_version,
    ort_tensorrt_cache_dir,
    tensorrt_provider_options,
)
from runtime.repository import ModelVersion
from runtime.tensorrt import BatchProfile, select_or_build_engine

from .timing import RoundsTotal, time_callable, time_in_rounds

TENSORRT_ENGINE = "tensorrt-engine"  # the provider label of native TensorRT engines (runtime/tensorrt.py)
# Published ImageNet-1k top-1 at 224 px, labelled as published: we have no ImageNet here to measure it.
PUBLISHED_TOP1 = {
    ("convnext_tiny", "gelu"): (82.1, "Liu et al. 2022, Table 1 (ConvNeXt-T, ImageNet-1k, 224 px)"),
    ("convnext_tiny", "relu"): (None, "not published for the final ConvNeXt-T; the paper's ablation (Sec. 2.6) "
                                "reports that replacing ReLU with GELU leaves accuracy unchanged (80.6%)"),
    ("convnext_atto", "gelu"): (None, "not measured here; see timm's model card for convnext_atto"),
    ("convnext_atto", "relu"): (None, "not published"),
    ("resnet50", "relu"): (76.13, "torchvision ResNet50_Weights.IMAGENET1K_V1 (80.86 with IMAGENET1K_V2 recipe)"),
}


@dataclass(frozen=True)
class EngineResult:
    model: str | None  # None: not known (a bare ONNX file, outside a model repository)
    activation: str | None
    precision: str | None
    provider: str
    batch_size: int
    threads: int
    images_per_s: float
    p50_ms: float
    p99_ms: float
    iterations: int
    # TensorRT only (native engines and ORT's TensorRT provider): the optimization profile's opt batch, the batch
    # size its kernels were chosen for; None for every other engine.
    opt_batch: int | None = None


def make_session(onnx_path: Path, provider: str = "cpu", threads: int | None = None, *,
                 precision: str | None = None, max_batch_size: int | None = None):
    """A session on exactly `provider` (runtime/ort_session.py refuses a quiet CPU fallback), threads for throughput.

    precision and max_batch_size matter to the TensorRT provider only (see gpu_provider_options)."""
    import onnxruntime as ort

    available_provider(provider)  # refused before its options are built from the file
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or usable_cpus()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    provider_options = gpu_provider_options(onnx_path, provider, precision, max_batch_size)
    return create_session(onnx_path, provider, options, provider_options)


def gpu_provider_options(onnx_path: Path, provider: str, precision: str | None, max_batch_size: int | None) -> dict:
    """The service's CUDA / TensorRT provider options; ORT-TensorRT's profile over batch 1..max_batch_size, its
    caches beside the ONNX file (in the version folder, as the service keeps them).

    TensorRT's precision flags follow the artifact's precision, as the service sets them (runtime/engines/factory.py):
    the file cannot tell it, since the exporter keeps an fp16 graph's inputs and outputs fp32 (keep_io_types).
    """
    if provider == "cpu":
        return {}
    options = {"cuda": cuda_provider_options()}
    if provider == "tensorrt":
        import onnx

        if precision is None or max_batch_size is None:
            raise ValueError(f"TensorRT provider options for {onnx_path} need its precision and the profile's max "
                             f"batch size (got {precision}, {max_batch_size}); for a file outside a model repository "
                             "pass --precision")
        model = onnx.load(str(onnx_path), load_external_data=False)
        graph_input = model.graph.input[0]
        shape = tuple(d.dim_value for d in graph_input.type.tensor_type.shape.dim[1:])
        cache = ort_tensorrt_cache_dir(Path(onnx_path).parent, onnxruntime_version())
        options["tensorrt"] = tensorrt_provider_options(cache, graph_input.name, shape, max_batch_size, precision)
    return options


def session_runner(session, batch_size: int) -> Callable[[], object]:
    """One call of an ONNX Runtime session on a seeded random batch of its input shape, in its input's type (the
    exporter's files all take float32; `bench engine` also times files from elsewhere, fp16 inputs included)."""
    inp = session.get_inputs()[0]
    channels, height, width = (d if isinstance(d, int) else 224 for d in inp.shape[1:])
    x = np.random.default_rng(0).standard_normal((batch_size, channels, height, width), dtype=np.float32)
    if inp.type == "tensor(float16)":
        x = x.astype(np.float16)
    return lambda: session.run(None, {inp.name: x})


def time_session(session, batch_size: int, warmup: int, iterations: int,
                 max_seconds: float) -> tuple[float, list[float]]:
    """time_callable for an ONNX Runtime session (session_runner)."""
    return time_callable(session_runner(session, batch_size), batch_size, warmup, iterations, max_seconds)


def tensorrt_profile(batch_sizes: Sequence[int]) -> BatchProfile:
    """A sweep's native-engine profile: batch 1..the largest timed, opt = max, as the service's engines
    (runtime/engines/tensorrt.py: opt = max = its max batch size) and ORT-TensorRT's profile (runtime/ort_session.py).
    TensorRT picks each layer's kernels for the opt shape, so every batch of the sweep runs on the kernels a loaded
    service runs; an opt under the largest batch would time that batch on kernels tuned for a smaller one."""
    largest = max(batch_sizes)
    return BatchProfile(1, largest, largest)


def open_tensorrt(version, precision: str, batch_sizes: Sequence[int]) -> tuple[TensorRTEngine, int]:
    """The version's native engine for the sweep (found, or built and verified against ONNX Runtime, and cached in
    the version), loaded as the service loads it (pinned buffers allocated once, one stream), and its profile's opt
    batch: an engine the version already has is used when its batch range covers the sweep, whatever its opt."""
    artifact, version = select_or_build_engine(version, precision, tensorrt_profile(batch_sizes))
    m = version.manifest
    shape = (m.input.channels, m.input.height, m.input.width)
    engine = TensorRTEngine(version.artifact_path(artifact), shape, precision=precision,
                            max_batch_size=max(batch_sizes), input_name=m.input.name, output_name=m.output_name,
                            model=version)
    engine.load()
    return engine, BatchProfile.of(artifact).opt_batch


def tensorrt_runner(engine: TensorRTEngine, batch_size: int) -> Callable[[], object]:
    """One call of the engine's run on a seeded random float32 batch: host->device copy, execution and device->host
    copy, exactly as the service pays them."""
    shape = engine.describe().input_shape
    x = np.random.default_rng(0).standard_normal((batch_size, *shape)).astype(np.float32)
    return lambda: engine.run(x)


def benchmark_tensorrt(version, precision: str, batch_sizes: Sequence[int], *, warmup: int = 2, iterations: int = 20,
                       max_seconds: float = 10.0, model: str | None = None, activation: str | None = None,
                       threads: int | None = None) -> list[EngineResult]:
    """One native TensorRT engine (profile: tensorrt_profile) vs batch size, the service's TensorRTEngine.run timed."""
    engine, opt_batch = open_tensorrt(version, precision, batch_sizes)
    results = []
    try:
        for batch_size in batch_sizes:
            rate, latencies = time_callable(tensorrt_runner(engine, batch_size), batch_size, warmup, iterations,
                                            max_seconds)
            results.append(EngineResult(model, activation, precision, TENSORRT_ENGINE, batch_size, 0, rate,
                                        float(np.percentile(latencies, 50)), float(np.percentile(latencies, 99)),
                                        len(latencies), opt_batch))
    finally:
        engine.close()
    return results


def benchmark_onnx(onnx_path: Path, batch_sizes: Sequence[int], *, provider: str = "cpu", threads: int | None = None,
                   warmup: int = 2, iterations: int = 20, max_seconds: float = 10.0, model: str | None = None,
                   activation: str | None = None, precision: str | None = None,
                   max_batch_size: int | None = None) -> list[EngineResult]:
    """ONNX Runtime images/s and p50/p99 per batch size. The TensorRT provider's profile covers batch
    1..max_batch_size (default: the largest batch size timed), opt = max as the service's (the rows say so)."""
    threads = threads or usable_cpus()
    max_batch_size = max_batch_size or max(batch_sizes)
    if max_batch_size < max(batch_sizes):
        raise ValueError(f"max_batch_size {max_batch_size} is under the largest batch size timed, {max(batch_sizes)}")
    session = make_session(onnx_path, provider, threads, precision=precision, max_batch_size=max_batch_size)
    opt_batch = max_batch_size if provider == "tensorrt" else None
    results = []
    for batch_size in batch_sizes:
        rate, latencies = time_session(session, batch_size, warmup, iterations, max_seconds)
        results.append(EngineResult(model, activation, precision, provider, batch_size, threads, rate,
                                    float(np.percentile(latencies, 50)), float(np.percentile(latencies, 99)),
                                    len(latencies), opt_batch))
    return results


def export_variant(repository_root: Path, model_name: str, activation: str, precisions: Sequence[str]):
    """Export one random-init model; drops precisions the exporter cannot build yet (returns which it built)."""
    name = f"{model_name.replace('_', '-')}-{activation}"
    wanted = ["fp32"] + [p for p in precisions if p != "fp32"]
    try:
        return export_onnx_version(repository_root, name, model_name, precisions=wanted, activation=activation,
                                   num_classes=1000), {}
    except (ImportError, ValueError, RuntimeError) as err:  # e.g. export.quantize not available
        if wanted == ["fp32"]:
            raise
        skipped = {p: f"export failed: {err}" for p in wanted if p != "fp32"}
        return export_onnx_version(repository_root, name, model_name, precisions=["fp32"], activation=activation,
                                   num_classes=1000, overwrite=True), skipped


def compare_models(repository_root: Path, variants: Sequence[tuple[str, str]], precisions: Sequence[str],
                   batch_sizes: Sequence[int], providers: Sequence[str], tensorrt_precisions: Sequence[str] = (),
                   threads: int | None = None, warmup: int = 2, iterations: int = 20,
                   max_seconds: float = 10.0) -> dict:
    """GELU vs ReLU and ConvNeXt vs ResNet-50 in one run: cost, published top-1, engine throughput per precision.

    Every point is timed in alternating rounds across the variants (bench/timing.py: time_in_rounds), one provider
    (ONNX Runtime's, then the native TensorRT engines) and precision at a time, so a ratio between two variants never
    spans minutes of the machine's drift.
    """
    from model.flops import measure

    rows: dict[str, dict] = {}
    versions: dict[str, tuple[str, str, ModelVersion]] = {}
    skipped: dict[str, str] = {}
    onnx_files: dict[str, str] = {}
    for model_name, activation in variants:
        cost = measure(model_name, activation=activation)
        version, not_built = export_variant(repository_root, model_name, activation, precisions)
        top1, source = PUBLISHED_TOP1.get((model_name, activation), (None, "not published"))
        key = f"{model_name}/{activation}"
        skipped.update({f"{key}/{p}": why for p, why in not_built.items()})
        versions[key] = (model_name, activation, version)
        onnx_files.update({f"{key}/{a.precision}": str(version.artifact_path(a))
                           for a in version.manifest.artifacts if a.format == "onnx"})
        rows[key] = {"model": model_name, "activation": activation, "params_m": cost.params_m, "gmacs": cost.gmacs,
                     "published_top1": top1, "published_top1_source": source,
                     "measured_top1": "not measured here (no ImageNet)", "weights": "random init (speed only)",
                     "results": []}
    threads = threads or usable_cpus()
    for provider in providers:
        for precision in dict.fromkeys(["fp32", *precisions]):
            if precision == "bf16":  # ONNX Runtime has no bfloat16 Conv: the variant is TensorRT's
                continue
            for key, result in _interleaved_points(versions, provider, precision, batch_sizes, threads, skipped,
                                                   warmup=warmup, iterations=iterations, max_seconds=max_seconds):
                rows[key]["results"].append(asdict(result))
    for precision in tensorrt_precisions:
        for key, result in _interleaved_tensorrt_points(versions, precision, batch_sizes, skipped, warmup=warmup,
                                                        iterations=iterations, max_seconds=max_seconds):
            rows[key]["results"].append(asdict(result))
    return {"models": list(rows.values()), "skipped": skipped, "onnx_files": onnx_files}


def _points_in_rounds(runners: Mapping[str, Callable[[int], Callable[[], object]]], batch_sizes: Sequence[int],
                      point: Callable[[str, int, RoundsTotal], EngineResult],
                      on_error: Callable[[str, Exception], None], **timing) -> list[tuple[str, EngineResult]]:
    """(variant key, its point) for every batch size, the variants timed in alternating rounds: runners[key](batch)
    is one call of that variant's engine; a variant that fails at one batch size is not timed at the next."""
    points = []
    for batch_size in batch_sizes:
        totals = time_in_rounds({key: runner(batch_size) for key, runner in runners.items()}, batch_size,
                                on_error=on_error, **timing)
        points += [(key, point(key, batch_size, total)) for key, total in totals.items()]
        runners = {key: runners[key] for key in totals}
    return points


def _interleaved_points(versions: dict, provider: str, precision: str, batch_sizes: Sequence[int], threads: int,
                        skipped: dict[str, str], **timing) -> list[tuple[str, EngineResult]]:
    """(variant key, its point) for every batch size, the variants' ONNX Runtime sessions in alternating rounds."""
    sessions = _sessions(versions, provider, precision, threads, max(batch_sizes), skipped)
    opt_batch = max(batch_sizes) if provider == "tensorrt" else None

    def point(key: str, batch_size: int, total: RoundsTotal) -> EngineResult:
        model_name, activation, _ = versions[key]
        return _rounds_result(model_name, activation, precision, provider, batch_size, threads, total, opt_batch)

    def record(key: str, err: Exception) -> None:
        skipped[f"{key}/{precision}/{provider}"] = f"{type(err).__name__}: {err}"

    runners = {key: functools.partial(session_runner, session) for key, session in sessions.items()}
    return _points_in_rounds(runners, batch_sizes, point, record, **timing)


def _interleaved_tensorrt_points(versions: dict, precision: str, batch_sizes: Sequence[int], skipped: dict[str, str],
                                 **timing) -> list[tuple[str, EngineResult]]:
    """The variants' native TensorRT engines of `precision` (open_tensorrt: all loaded at once, each with its own
    buffers), timed in alternating rounds as the ONNX Runtime sessions are; a variant whose engine fails to build or
    load (no TensorRT or GPU here, a failed parity check) is recorded in `skipped`."""
    engines: dict[str, tuple[TensorRTEngine, int]] = {}

    def record(key: str, err: Exception) -> None:
        skipped[f"{key}/{precision}/{TENSORRT_ENGINE}"] = f"{type(err).__name__}: {err}"

    def point(key: str, batch_size: int, total: RoundsTotal) -> EngineResult:
        model_name, activation, _ = versions[key]
        return _rounds_result(model_name, activation, precision, TENSORRT_ENGINE, batch_size, 0, total,
                              engines[key][1])

    try:
        for key, (_, _, version) in versions.items():
            try:
                engines[key] = open_tensorrt(version, precision, batch_sizes)
            except Exception as err:  # noqa: BLE001 - no TensorRT / GPU here, or a failed build: recorded
                record(key, err)
        runners = {key: functools.partial(tensorrt_runner, engine) for key, (engine, _) in engines.items()}
        return _points_in_rounds(runners, batch_sizes, point, record, **timing)
    finally:
        for engine, _ in engines.values():
            engine.close()


def _rounds_result(model_name: str, activation: str, precision: str, provider: str, batch_size: int, threads: int,
                   total: RoundsTotal, opt_batch: int | None) -> EngineResult:
    return EngineResult(model_name, activation, precision, provider, batch_size, threads, total.images_per_s,
                        float(np.percentile(total.latencies_ms, 50)), float(np.percentile(total.latencies_ms, 99)),
                        len(total.latencies_ms), opt_batch)


def _sessions(versions: dict, provider: str, precision: str, threads: int, max_batch_size: int,
              skipped: dict[str, str]) -> dict:
    """A session per variant that has an ONNX artifact of `precision`, on `provider` (one TensorRT profile over the
    whole sweep: its largest batch is the profile's max and opt); a variant whose session fails is recorded."""
    sessions = {}
    for key, (_, _, version) in versions.items():
        artifact = version.manifest.find("onnx", precision)
        if artifact is None:
            continue
        try:
            sessions[key] = make_session(version.artifact_path(artifact), provider, threads, precision=precision,
                                         max_batch_size=max_batch_size)
        except Exception as err:  # noqa: BLE001 - one provider/precision failing must not end the run
            skipped[f"{key}/{precision}/{provider}"] = f"{type(err).__name__}: {err}"
    return sessions
