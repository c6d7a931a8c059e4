"""`python -m bench roadmap`: images/s of every roadmap step (Table 10 or 11) on each engine, in one run.

Every step is exported first through the normal path (export.onnx, parity-verified against PyTorch) with random
weights. Then each CPU engine (ONNX Runtime fp32, PyTorch eager fp32 and, when the `openvino` package is importable,
OpenVINO CPU with f32 and bf16 inference precision) holds every step at once and times them at batch 1 and a
throughput batch in alternating rounds (bench/roadmap_timing.py), so a step's delta to the row it modifies carries
none of the machine's drift over the run. On a GPU host, `--engines gpu` times TensorRT fp16 and bf16 engines and
ONNX Runtime CUDA fp32 instead, one step after another (bench/roadmap_engines.py). Accuracy is the paper's, never
measured here; speed does not depend on the weights. The report (bench/roadmap_report.py) sets each step's delta
top-1 against its delta images/s.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import tempfile
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import numpy as np
import torch

from convnext_common import CliParser, add_version_argument, positive_int, positive_number, prog_name, usable_cpus
from export.onnx import export_onnx_version
from model import create_model
from model.__main__ import roadmap_rows
from model.roadmap_steps import REGIMES, steps_of
from runtime.repository import ModelRepository, ModelVersion
from runtime.signal_stack import signal_stack_kept

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
from .roadmap_timing import EngineFactory, ExportedStep, PointTiming, record_failure, step_failure, time_cpu_engines
from .timing import MIN_TIMED_CALLS, ROUNDS

PROG = "python -m bench roadmap"


def onnxruntime_engine(onnx_path: Path, model: str, threads: int):
    session = make_session(onnx_path, "cpu", threads)
    return lambda batch: session.run(None, {"input": batch})


def pytorch_engine(onnx_path: Path, model: str, threads: int):
    module = create_model(model).eval()  # random weights, as the export's: speed does not depend on them

    def run(batch: np.ndarray):
        with torch.inference_mode():
            return module(torch.from_numpy(batch))
    return run


def openvino_engine(precision: str) -> EngineFactory:
    """OpenVINO CPU, one synchronous request, `precision` ("f32" | "bf16") as its inference precision hint."""
    def factory(onnx_path: Path, model: str, threads: int):
        import openvino as ov  # optional: only where the package is installed

        with signal_stack_kept():  # the CPU plugin's sigaltstack, as the service's engine (runtime/signal_stack.py)
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


def export_step(row: dict, repository: Path, input_size: int,
                precisions: tuple[str, ...]) -> tuple[ModelVersion, float]:
    """One step exported (parity-verified, with the ONNX variants `precisions`) into the run's repository, and the
    seconds that took (random weights: the export seeds them)."""
    started = time.perf_counter()
    version = export_onnx_version(repository, row["key"].replace("_", "-"), row["model"], version=1,
                                  input_size=input_size, precisions=precisions)
    export_s = time.perf_counter() - started
    print(f"  {row['row']:2d} {row['key']:24s} exported in {export_s:5.1f} s", flush=True)
    return version, export_s


def time_gpu_engines(rows: list[dict], versions: dict[str, ModelVersion], engines: tuple[str, ...], args,
                     failed: dict[str, str]) -> dict[str, dict[str, dict]]:
    """{step key: {engine: {batch: point}}} for the GPU engines, one step after another (not in rounds: each step's
    TensorRT engine is built, verified and timed in turn). An engine that fails is not tried on later steps."""
    results: dict[str, dict[str, dict]] = {row["key"]: {} for row in rows}
    for row in rows:
        for engine in (e for e in engines if e not in failed):
            try:
                results[row["key"]][engine] = time_gpu_engine(engine, versions[row["key"]], args.batch_sizes,
                                                              args.seconds, args.threads)
            except Exception as err:  # noqa: BLE001 - one engine failing (a build, a parity miss) must not end the run
                record_failure(engine, step_failure(row["key"], err), failed)
    return results


def step_result(row: dict, version: ModelVersion, export_s: float, results: dict[str, dict], repository: Path) -> dict:
    """One step's entry in results.json: its row, export, parity, points per engine and the engines' own parity."""
    parity = version.manifest.find("onnx", "fp32").parity
    built = ModelRepository(repository).load(version.manifest.name, 1, verify_files=False).manifest.artifacts
    print(f"  {row['row']:2d} {row['key']:24s} " + "  ".join(
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
    parser.add_argument("--seconds", type=positive_number, default=2.5,
                        help="timed seconds per step, engine and batch size (CPU: split over the rounds)")
    parser.add_argument("--rounds", type=positive_int, default=ROUNDS,
                        help="CPU engines: alternating rounds over every step per batch size (the order reversed "
                             "every other round)")
    parser.add_argument("--input-size", type=positive_int, default=224, help="square input side in px")
    parser.add_argument("--threads", type=positive_int, default=usable_cpus(),
                        help="engine threads (default: every core this process may use)")
    parser.add_argument("--engines", nargs="+", default=["cpu"], metavar="NAME",
                        help=f"engines or groups to time (default: cpu): {sorted(GROUPS)} or "
                             f"{[*CPU_ENGINES, *GPU_ENGINES]}; gpu = TensorRT fp16 + bf16 engines and ONNX Runtime "
                             "CUDA fp32, on a GPU host only")
    parser.add_argument("--out", type=Path, default=Path("bench-results/roadmap"))
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = get_args_parser()
    args = parser.parse_args(argv)
    if args.input_size < 32:
        parser.error("--input-size must be >= 32 (4 stages of /2)")
    if args.rounds < 2:
        parser.error("--rounds must be at least 2: one round times the steps one after another, as the alternating "
                     "rounds are there to avoid, and gives no per-round range")
    try:
        selected = select_engines(args.engines)
    except ValueError as err:
        parser.error(str(err))
    keys = [s.key for s in steps_of(args.regime)]
    unknown = set(args.steps or ()) - set(keys)
    if unknown:
        print(f"{prog_name(PROG)}: error: unknown step keys {sorted(unknown)}; choose from {keys}", file=sys.stderr)
        return 2
    factories, cpu_skipped = cpu_engines()
    plan = plan_engines(selected, factories, cpu_skipped)
    problem, target = gpu_problem(plan.gpu) if plan.gpu else (None, None)
    if problem:  # before any export: one line, no traceback
        print(f"{prog_name(PROG)}: error: this host cannot run {list(plan.gpu)}: {problem}. Without a GPU: "
              "--engines cpu", file=sys.stderr)
        return 2
    if not plan.engines:
        print(f"{prog_name(PROG)}: error: none of {selected} can run here: {plan.skipped}", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    results, failed = run_roadmap(args, plan, factories, target)
    results["config"]["command"] = " ".join([PROG, *(sys.argv[2:] if argv is None else argv)])
    if not results["engines"]:
        print(f"{prog_name(PROG)}: error: every engine failed: {failed}", file=sys.stderr)
        return 1
    files = write_report(results, args.out)
    print((args.out / "report.md").read_text())
    print("wrote", ", ".join(str(p) for p in files.values()))
    if failed:
        print(f"{prog_name(PROG)}: error: {len(failed)} engine(s) failed and are left out of the report: {failed}",
              file=sys.stderr)
    return 1 if failed else 0


def run_roadmap(args, plan: EnginePlan, factories: dict[str, EngineFactory], target) -> tuple[dict, dict[str, str]]:
    """Every step on every planned engine; the results document (failed engines left out) and the failures."""
    rows = roadmap_rows(args.regime, args.steps, args.input_size)  # GMACs at the size timed, not the paper's 224
    precisions = onnx_precisions(plan.gpu, target.weakly_typed if target is not None else False)
    load_before = os.getloadavg()
    print(f"roadmap {args.regime}: {len(rows)} steps x {plan.engines} x batch {args.batch_sizes}", flush=True)
    failed: dict[str, str] = {}
    with tempfile.TemporaryDirectory() as tmp:
        repository = Path(tmp)
        exported = {row["key"]: export_step(row, repository, args.input_size, precisions) for row in rows}
        versions = {key: version for key, (version, _) in exported.items()}
        to_time = [ExportedStep(row["key"], row["model"], _onnx_fp32(versions[row["key"]])) for row in rows]
        timing = PointTiming(tuple(args.batch_sizes), args.seconds, args.rounds, args.input_size, args.threads)
        cpu = time_cpu_engines(to_time, factories, plan.cpu, timing, failed)
        gpu = time_gpu_engines(rows, versions, plan.gpu, args, failed)
        steps = [step_result(row, *exported[row["key"]], {**cpu[row["key"]], **gpu[row["key"]]}, repository)
                 for row in rows]
    steps, engines, failures = drop_failed_engines(steps, plan.engines, failed)
    results = {
        "config": {"regime": args.regime, "source": REGIMES[args.regime], "batch_sizes": args.batch_sizes,
                   "seconds_per_point": args.seconds, "rounds": args.rounds,
                   "min_calls_per_point": MIN_TIMED_CALLS,
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


def _onnx_fp32(version: ModelVersion) -> Path:
    return version.artifact_path(version.manifest.find("onnx", "fp32"))


def _version(package: str) -> str | None:
    try:
        return version(package)
    except PackageNotFoundError:
        return None
