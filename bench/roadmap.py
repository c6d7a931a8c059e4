"""`python -m bench roadmap`: images/s of every roadmap step (Table 10 or 11) on each engine, in one run.

Each step is exported through the normal path (export.onnx, parity-verified against PyTorch) with random weights,
then timed at batch 1 and a throughput batch on ONNX Runtime CPU fp32, PyTorch eager fp32 and, when the `openvino`
package is importable, OpenVINO CPU with f32 and bf16 inference precision. On a GPU host, `--engines gpu` times
TensorRT fp16 and bf16 engines and ONNX Runtime CUDA fp32 instead (bench/roadmap_engines.py). Accuracy is the
paper's, never measured here; speed does not depend on the weights. The report (bench/roadmap_report.py) sets each
step's delta top-1 against its delta images/s.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import tempfile
import time
from collections.abc import Callable
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import numpy as np
import torch

from convnext_common import CliParser, add_version_argument, positive_int
from export.onnx import export_onnx_version
from model import create_model
from model.__main__ import roadmap_rows
from model.roadmap_steps import REGIMES, steps_of
from runtime.repository import ModelRepository

from .engine_benchmark import make_session
from .host import host_description
from .roadmap_engines import (
    CPU_ENGINES,
    GPU_ENGINES,
    GROUPS,
    EnginePlan,
    drop_failed_engines,
    engine_parities,
    gpu_problem,
    onnx_precisions,
    plan_engines,
    select_engines,
    time_gpu_engine,
)
from .roadmap_report import write_report
from .timing import MIN_TIMED_CALLS, time_callable

PROG = "python -m bench roadmap"
# An engine: (step's ONNX file, eval module, threads) -> run(batch) -> logits; None when it cannot run here.
EngineFactory = Callable[[Path, torch.nn.Module, int], Callable[[np.ndarray], object]]


def onnxruntime_engine(onnx_path: Path, module: torch.nn.Module, threads: int):
    session = make_session(onnx_path, "cpu", threads)
    return lambda batch: session.run(None, {"input": batch})


def pytorch_engine(onnx_path: Path, module: torch.nn.Module, threads: int):
    def run(batch: np.ndarray):
        with torch.inference_mode():
            return module(torch.from_numpy(batch))
    return run


def openvino_engine(precision: str) -> EngineFactory:
    """OpenVINO CPU, one synchronous request, `precision` ("f32" | "bf16") as its inference precision hint."""
    def factory(onnx_path: Path, module: torch.nn.Module, threads: int):
        import openvino as ov  # optional: only where the package is installed

        compiled = ov.Core().compile_model(str(onnx_path), "CPU", {
            "INFERENCE_PRECISION_HINT": precision, "INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": "LATENCY"})
        request = compiled.create_infer_request()
        return lambda batch: request.infer({0: batch})
    return factory


def cpu_engines() -> tuple[dict[str, EngineFactory], dict[str, str]]:
    """The engines to time here, and why any other is left out."""
    engines: dict[str, EngineFactory] = {"onnxruntime-fp32": onnxruntime_engine, "pytorch-eager-fp32": pytorch_engine}
    skipped: dict[str, str] = {}
    if importlib.util.find_spec("openvino") is None:
        skipped["openvino"] = "not installed (pip install openvino to time OpenVINO f32/bf16)"
        return engines, skipped
    import openvino as ov

    capabilities = ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    engines["openvino-f32"] = openvino_engine("f32")
    if "BF16" in capabilities:
        engines["openvino-bf16"] = openvino_engine("bf16")
    else:
        skipped["openvino-bf16"] = f"this CPU has no BF16 capability for OpenVINO (has {capabilities})"
    return engines, skipped


def time_engine(run, batch_size: int, input_size: int, seconds: float) -> dict:
    x = np.random.default_rng(0).standard_normal((batch_size, 3, input_size, input_size)).astype(np.float32)
    rate, latencies = time_callable(lambda: run(x), batch_size, warmup=2, iterations=10**6, max_seconds=seconds)
    return {"images_per_s": rate, "p50_ms": float(np.percentile(latencies, 50)), "calls": len(latencies)}


def benchmark_step(row: dict, repository: Path, plan: EnginePlan, factories: dict[str, EngineFactory], args,
                   failed: dict[str, str], precisions: tuple[str, ...] = ("fp32",)) -> dict:
    """Export one step (parity-verified, with the ONNX variants `precisions`), then time it on every engine at every
    batch size. An engine that fails goes into `failed` (with the step) and is not tried on later steps."""
    torch.manual_seed(0)
    started = time.perf_counter()
    version = export_onnx_version(repository, row["key"].replace("_", "-"), row["model"], version=1,
                                  input_size=args.input_size, precisions=precisions)
    export_s = time.perf_counter() - started
    onnx_path = version.artifact_path(version.manifest.find("onnx", "fp32"))
    module = create_model(row["model"]).eval()
    results: dict[str, dict] = {}
    for engine in (e for e in plan.engines if e not in failed):
        try:
            if engine in factories:
                run = factories[engine](onnx_path, module, args.threads)
                results[engine] = {str(b): time_engine(run, b, args.input_size, args.seconds)
                                   for b in args.batch_sizes}
                del run
            else:
                results[engine] = time_gpu_engine(engine, version, args.batch_sizes, args.seconds, args.threads)
        except Exception as err:  # noqa: BLE001 - one engine failing (a build, a parity miss) must not end the run
            failed[engine] = f"step {row['key']}: {type(err).__name__}: {' '.join(str(err).split())}"
            print(f"  {engine} failed on {row['key']}: {failed[engine]}", flush=True)
    parity = version.manifest.find("onnx", "fp32").parity
    built = ModelRepository(repository).load(version.manifest.name, 1, verify_files=False).manifest.artifacts
    print(f"  {row['row']:2d} {row['key']:24s} export {export_s:5.1f} s  " + "  ".join(
        f"{e} " + "/".join(f"{r['images_per_s']:.1f}" for r in res.values()) for e, res in results.items()), flush=True)
    return {**row, "export_s": round(export_s, 1), "parity_max_abs_diff": parity.max_abs_diff,
            "parity_top1_agreement": parity.top1_agreement, "results": results,
            "engine_parity": engine_parities(built, results)}


def get_args_parser() -> argparse.ArgumentParser:
    parser = CliParser(prog=PROG, description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    add_version_argument(parser)
    parser.add_argument("--regime", choices=sorted(REGIMES), default="r50", help="r50: Table 10; r200: Table 11")
    parser.add_argument("--steps", nargs="+", metavar="KEY", help="only these step keys (default: every row)")
    parser.add_argument("--batch-sizes", type=positive_int, nargs="+", default=[1, 8],
                        help="batch 1 and a throughput batch")
    parser.add_argument("--seconds", type=float, default=2.5, help="timed seconds per engine and batch size")
    parser.add_argument("--input-size", type=positive_int, default=224, help="square input side in px")
    parser.add_argument("--threads", type=positive_int, default=os.cpu_count() or 1,
                        help="engine threads (default: every core)")
    parser.add_argument("--engines", nargs="+", default=["cpu"], metavar="NAME",
                        help=f"engines or groups to time (default: cpu): {sorted(GROUPS)} or "
                             f"{[*CPU_ENGINES, *GPU_ENGINES]}; gpu = TensorRT fp16 + bf16 engines and ONNX Runtime "
                             "CUDA fp32, on a GPU host only")
    parser.add_argument("--out", type=Path, default=Path("bench-results/roadmap"))
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = get_args_parser()
    args = parser.parse_args(argv)
    if min(args.batch_sizes) < 1 or args.seconds <= 0 or args.threads < 1 or args.input_size < 32:
        parser.error("--batch-sizes and --threads must be >= 1, --seconds > 0, --input-size >= 32 (4 stages of /2)")
    try:
        selected = select_engines(args.engines)
    except ValueError as err:
        parser.error(str(err))
    keys = [s.key for s in steps_of(args.regime)]
    unknown = set(args.steps or ()) - set(keys)
    if unknown:
        print(f"{PROG}: error: unknown step keys {sorted(unknown)}; choose from {keys}", file=sys.stderr)
        return 2
    factories, cpu_skipped = cpu_engines()
    plan = plan_engines(selected, factories, cpu_skipped)
    problem, target = gpu_problem(plan.gpu) if plan.gpu else (None, None)
    if problem:  # before any export: one line, no traceback
        print(f"{PROG}: error: this host cannot run {list(plan.gpu)}: {problem}. Without a GPU: --engines cpu",
              file=sys.stderr)
        return 2
    if not plan.engines:
        print(f"{PROG}: error: none of {selected} can run here: {plan.skipped}", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    results, failed = run_roadmap(args, plan, factories, target)
    results["config"]["command"] = " ".join([PROG, *(sys.argv[2:] if argv is None else argv)])
    if not results["engines"]:
        print(f"{PROG}: error: every engine failed: {failed}", file=sys.stderr)
        return 1
    files = write_report(results, args.out)
    print((args.out / "report.md").read_text())
    print("wrote", ", ".join(str(p) for p in files.values()))
    if failed:
        print(f"{PROG}: error: {len(failed)} engine(s) failed and are left out of the report: {failed}",
              file=sys.stderr)
    return 1 if failed else 0


def run_roadmap(args, plan: EnginePlan, factories: dict[str, EngineFactory], target) -> tuple[dict, dict[str, str]]:
    """Every step on every planned engine; the results document (failed engines left out) and the failures."""
    rows = roadmap_rows(args.regime, args.steps)
    precisions = onnx_precisions(plan.gpu, target.weakly_typed if target is not None else False)
    load_before = os.getloadavg()
    print(f"roadmap {args.regime}: {len(rows)} steps x {plan.engines} x batch {args.batch_sizes}", flush=True)
    failed: dict[str, str] = {}
    with tempfile.TemporaryDirectory() as repository:
        steps = [benchmark_step(row, Path(repository), plan, factories, args, failed, precisions) for row in rows]
    steps, engines, failures = drop_failed_engines(steps, plan.engines, failed)
    results = {
        "config": {"regime": args.regime, "source": REGIMES[args.regime], "batch_sizes": args.batch_sizes,
                   "seconds_per_point": args.seconds, "min_calls_per_point": MIN_TIMED_CALLS,
                   "input_size": args.input_size, "threads": args.threads},
        "device": " + ".join(d for d, names in (("CPU", plan.cpu), ("GPU", plan.gpu)) if names),
        "host": host_description(target),
        "load_average_before": [round(v, 2) for v in load_before],
        "load_average_after": [round(v, 2) for v in os.getloadavg()],
        "versions": {"torch": torch.__version__, "onnxruntime": _version("onnxruntime") or _version("onnxruntime-gpu"),
                     "openvino": _version("openvino"), "tensorrt": target.tensorrt_version if target else None},
        "engines": engines, "skipped_engines": {**plan.skipped, **failures}, "steps": steps,
    }
    return results, failed


def _version(package: str) -> str | None:
    try:
        return version(package)
    except PackageNotFoundError:
        return None
