"""`python -m bench` / `convnext bench`: engine, load and `all` (engine + model comparison + service vs peer) runs."""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
from dataclasses import asdict, replace
from pathlib import Path

from bench import cpu_engines, cpu_serving, serve_benchmark, soak
from bench.api_key import API_KEY_HEADER, API_KEY_VARIABLE, api_key_from, what_to_check
from bench.engine_benchmark import benchmark_onnx, compare_models
from bench.host import host_description
from bench.loadgen import PAYLOAD_SIZES, LoadResult, check_loopback, closed_loop, jpeg_payloads
from bench.lone_request import lone_requests
from bench.open_loop import open_loop
from bench.preprocess_cost import preprocess_report
from bench.presets import PRESETS, Preset, ServedEngine
from bench.report import batch_distribution, batch_histogram, service_efficiency, write_report
from bench.server_process import litserve_peer, measurement_pins, service
from bench.service_metrics import scrape
from bench.service_repository import without_engines
from convnext_common import (
    CliParser,
    add_version_argument,
    exit_on_expected_errors,
    exit_status,
    one_line,
    positive_int,
    positive_number,
    prog_name,
    usable_cpus,
)
from export.onnx import PRECISIONS
from runtime.repository import MANIFEST_FILE, VERSION_PATTERN, ModelRepository, RepositoryError
from runtime.tensorrt import tensorrt_target

PROG = "python -m bench"  # as the module runs; prog_name() gives it as the user ran it

QUEUE_DELAY_MS = 5.0
CLOSED_LOOP_REQUESTS = 200  # `bench load` without --rate: requests sent, unless --seconds ends it first


def load_runs(url: str, server: str, preset: Preset, payloads: list[bytes], form_field: str | None = None,
              concurrency_levels: tuple[int, ...] | None = None, open_loop_too: bool = True) -> list[dict]:
    """Closed loop at each concurrency, then (unless told not to) one open-loop run at the preset's rate."""
    runs = []
    for concurrency in concurrency_levels or preset.concurrency:
        result = asyncio.run(closed_loop(url, payloads, concurrency, preset.requests, preset.seconds,
                                         form_field=form_field))
        runs.append({"server": server, **result.summary(), "latencies_ms": result.latencies_ms})
    if not open_loop_too:
        return runs
    result = asyncio.run(open_loop(url, payloads, preset.rate, preset.requests, preset.seconds, form_field=form_field))
    runs.append({"server": server, **result.summary(), "latencies_ms": result.latencies_ms})
    return runs


def preprocess_and_low_load(repo: Path, served: str, payloads: list[bytes], engine: list[dict], load: list[dict],
                            threads: int, max_batch_size: int, by_size: list[dict] | None = None,
                            engine_on_cpu: bool = True) -> tuple[dict, dict | None]:
    """Preprocessing cost per image vs the engine's (at the service's max batch size), and a lone request's p50 vs the
    engine's batch-1 p50.

    The engine's CPU cost per image is its threads x its wall time per image, on the CPU only: a GPU engine's
    wall time is the GPU's, so none is given there."""
    spec = ModelRepository(repo).load(served, verify_files=False).manifest.preprocess
    at_max = [r for r in engine if r["batch_size"] == max_batch_size]
    engine_cpu_ms = threads * 1000 / at_max[0]["images_per_s"] if at_max and engine_on_cpu else None
    pre = preprocess_report(payloads, spec, engine_cpu_ms)
    lone = next((r for r in load if r["server"] == "ours" and r["mode"] == "closed" and r["concurrency"] == 1), None)
    batch1 = next((r for r in engine if r["batch_size"] == 1), None)
    if lone is None or lone["p50_ms"] is None or batch1 is None:
        return pre, None
    for row in by_size or []:
        row["engine_alone_p50_ms"] = batch1["p50_ms"]
        row["over_engine_ms"] = row["client_p50_ms"] - batch1["p50_ms"]
        row["preprocess_ms"] = next((r["total"] for r in pre["rows"] if r["size"] == row["size"]), None)
    return pre, {"service_p50_ms": lone["p50_ms"], "engine_p50_ms": batch1["p50_ms"],
                 "overhead_ms": lone["p50_ms"] - batch1["p50_ms"], "preprocess_ms": pre["mean_ms_per_image"],
                 "by_size": by_size or []}


def lone_request_breakdown(url: str, requests: int) -> list[dict]:
    """bench.lone_request per payload size, against the running service."""
    return [{"size": f"{w}x{h}", **lone_requests(url, jpeg_payloads(sizes=((w, h),)), requests)}
            for w, h in PAYLOAD_SIZES]


def open_loop_rate(preset: Preset, engine: list[dict]) -> float:
    """The configured arrival rate, or half the served engine's images/s at the max batch size (a moderate load)."""
    if preset.rate is not None:
        return preset.rate
    at_max = [r for r in engine if r["batch_size"] == preset.max_batch_size]
    return round(0.5 * at_max[0]["images_per_s"], 1) if at_max else 1.0


def our_service_args(repo: str, served: str, engine: ServedEngine, threads: int, max_batch_size: int,
                     ort_spinning: bool = True) -> list[str]:
    """`python -m service` flags for the engine the sweep timed alone: one ORT stream (a session runs one batch at a
    time there), exact decoding (as the peer decodes), every measured setting pinned against CONVNEXT_* variables."""
    return ["--repository", repo, "--model", served, "--max-batch-size", str(max_batch_size), "--intra-op-threads",
            str(threads), "--engine", engine.engine, "--provider", engine.provider, "--precision", engine.precision,
            *measurement_pins(ort_spinning=ort_spinning, max_queue_delay_ms=QUEUE_DELAY_MS)]


# A comparison phase that fails to start or run (its server exits, is never ready, its socket fails) is recorded in
# the results and the run goes on: the phases before it took many minutes.
PHASE_ERRORS = (RuntimeError, OSError)
SPINNING_OFF = "our service, ORT spinning off"


def load_our_service(repo: str, served: str, preset: Preset, payloads: list[bytes], threads: int) -> dict:
    """Our service under load, its batch sizes, and lone requests."""
    engine = preset.service
    args = our_service_args(repo, served, engine, threads, preset.max_batch_size)
    ready_s = 900 if engine.engine == "tensorrt" else 120  # a TensorRT build on first start takes minutes
    out: dict = {}
    with service(args, ready_timeout_s=ready_s) as server:
        before = batch_histogram(asyncio.run(scrape(server.url)))
        out["load"] = load_runs(f"{server.url}/classify", "ours", preset, payloads)
        out["batch_distribution"] = batch_distribution(before, batch_histogram(asyncio.run(scrape(server.url))))
        out["by_size"] = lone_request_breakdown(f"{server.url}/classify", preset.lone_requests)  # batches of one
    return out


def load_spinning_off(repo: str, served: str, preset: Preset, payloads: list[bytes], threads: int) -> list[dict]:
    """The ort_spinning trade-off, same run (CPU): a lone request's latency and saturated throughput with it off."""
    with service(our_service_args(repo, served, preset.service, threads, preset.max_batch_size,
                                  ort_spinning=False)) as server:
        return load_runs(f"{server.url}/classify", "ours (ORT spinning off)", preset, payloads,
                         concurrency_levels=(1, max(preset.concurrency)), open_loop_too=False)


def phase_failure(err: BaseException) -> str:
    """A failed phase as the report gives it: one line (a server's log tail is left to its own run)."""
    reason = one_line(str(err))[:500]
    return f"failed: {type(err).__name__}: {reason}" if reason else f"failed: {type(err).__name__}"


def load_peer(repo: str, served: str, preset: Preset, payloads: list[bytes], threads: int) -> list[dict]:
    """The LitServe peer under the same load and batching settings, on the repository's ONNX file of its engine's
    precision (preset.peer_engine: ours on CPU; ONNX Runtime CUDA where ours runs TensorRT)."""
    args = ["--repository", repo, "--model", served, "--max-batch-size", str(preset.max_batch_size),
            "--batch-timeout-ms", str(QUEUE_DELAY_MS), "--threads", str(threads), "--provider",
            preset.peer_engine.provider, "--precision", preset.peer_engine.precision]
    with litserve_peer(args) as peer:
        return load_runs(f"{peer.url}/predict", "litserve", preset, payloads, form_field="content")


def host_line(providers: list[str]) -> str:
    """The host, with its GPU named (as `bench roadmap` names it) when the run uses one, and its load average now."""
    target = tensorrt_target() if "cuda" in providers else None
    return f"{host_description(target)}, load average {tuple(round(x, 2) for x in os.getloadavg())}"


def run_all(preset: Preset, out_dir: Path, providers: list[str], threads: int) -> dict:
    """Export, engine sweep, model comparison, then load against our service and the peer. The report is written
    after every phase, so a later phase that fails loses none of the earlier ones; a comparison phase that fails (the
    peer, the spinning-off rerun) is recorded and the run goes on, a failure of our service ends it."""
    results: dict = {"config": {**asdict(preset), "providers": providers, "threads": threads,
                                "max_queue_delay_ms": QUEUE_DELAY_MS},
                     "host": host_line(providers), "phases": {}, "complete": False, "load": []}
    # The engine alone at the batch limit the service runs with (the preset's sweep times it): not a smaller one.
    results["efficiency_batch_size"] = preset.max_batch_size
    with tempfile.TemporaryDirectory(prefix="bench-repo-") as repo:
        results["compare"] = compare_models(Path(repo), preset.variants, preset.precisions, preset.batch_sizes,
                                            providers, preset.tensorrt_precisions, threads=threads,
                                            iterations=preset.iterations, max_seconds=preset.max_seconds)
        served = f"{preset.variants[0][0].replace('_', '-')}-{preset.variants[0][1]}"
        engine = preset.service
        served_provider = "tensorrt-engine" if engine.engine == "tensorrt" else engine.provider
        # The sweep's rows of the engine the service runs: efficiency and the low-load comparison are against them.
        # On the CPU that is the served engine; with --gpu the sweep's TensorRT engine (opt 64), not the service's own
        # build (opt = its max batch size), and the report says so.
        engine_rows = [r for r in results["compare"]["models"][0]["results"]
                       if r["precision"] == engine.precision and r["provider"] == served_provider]
        results["served_engine"] = {**asdict(engine), "engine_rows": f"{engine.precision}/{served_provider}"}
        preset = replace(preset, rate=open_loop_rate(preset, engine_rows))
        results["config"]["rate"] = preset.rate
        save_phase(results, "engine sweep", "done", out_dir, engine_rows)
        payloads = jpeg_payloads()
        served_repo = repo
        if engine.engine == "tensorrt":  # the service builds its own engine, for its max batch size
            served_repo = str(Path(repo) / "served")
            without_engines(Path(repo), served, Path(served_repo))
        try:
            ours = load_our_service(served_repo, served, preset, payloads, threads)
        except BaseException as err:  # the run ends here: what it measured so far is on disk, saying where it stopped
            save_phase(results, "our service", phase_failure(err), out_dir, engine_rows)
            raise
        results["load"], results["batch_distribution"] = ours["load"], ours["batch_distribution"]
        results["preprocess"], results["low_load"] = preprocess_and_low_load(
            Path(repo), served, payloads, engine_rows, results["load"], threads, preset.max_batch_size, ours["by_size"],
            engine_on_cpu=engine.provider == "cpu")
        save_phase(results, "our service", "done", out_dir, engine_rows)
        if engine.provider == "cpu":  # its own phase: an interrupted rerun loses none of the runs above
            try:
                results["load"] += load_spinning_off(served_repo, served, preset, payloads, threads)
                save_phase(results, SPINNING_OFF, "done", out_dir, engine_rows)
            except PHASE_ERRORS as err:
                save_phase(results, SPINNING_OFF, phase_failure(err), out_dir, engine_rows)
        if preset.peer:
            try:
                results["load"] += load_peer(repo, served, preset, payloads, threads)
                results["engines_under_load"] = {"ours": engine.label, "litserve": preset.peer_engine.label}
                save_phase(results, "LitServe peer", "done", out_dir, engine_rows)
            except PHASE_ERRORS as err:
                save_phase(results, "LitServe peer", phase_failure(err), out_dir, engine_rows)
    results["complete"] = True
    save_phase(results, None, None, out_dir, engine_rows)
    return results


def save_phase(results: dict, phase: str | None, outcome: str | None, out_dir: Path,
               engine_rows: list[dict]) -> None:
    """Record how `phase` ended and write the report as it stands (each closed-loop run's service efficiency
    against the sweep's engine alone at the service's max batch size; open loops are paced by their arrival rate)."""
    if phase is not None:
        results["phases"][phase] = outcome
    for run in results["load"]:
        closed = run["mode"] == "closed"
        run["efficiency"] = (service_efficiency(run["images_per_s"], engine_rows, results["efficiency_batch_size"])
                             if closed else None)
    write_report(results, out_dir)


def run_load(args: argparse.Namespace) -> LoadResult:
    """`bench load`: the closed loop, or the open loop with --rate; a RuntimeError when no request succeeded.

    The open loop's arrivals span --seconds unless --requests caps them (a default cap of 200 ended `--rate 20
    --seconds 30` after 10 s); the closed loop sends --requests (200) or runs --seconds, whichever ends first."""
    api_key = api_key_from(args.api_key)
    payloads = jpeg_payloads()
    if args.rate is not None:
        cap = sys.maxsize if args.requests is None else args.requests  # uncapped: the schedule ends at --seconds
        load = open_loop(args.url, payloads, args.rate, cap, args.seconds, form_field=args.form_field,
                         api_key=api_key)
    else:
        requests = CLOSED_LOOP_REQUESTS if args.requests is None else args.requests
        load = closed_loop(args.url, payloads, args.concurrency, requests, args.seconds, form_field=args.form_field,
                           api_key=api_key)
    result = asyncio.run(load)
    if result.ok == 0:
        first = f", the first with {result.first_error}" if result.first_error else ""
        raise RuntimeError(f"none of the {result.sent} requests to {args.url} succeeded{first}; "
                           f"{what_to_check(result.errors, api_key)}")
    return result


def repository_labels(onnx_path: Path) -> dict[str, str]:
    """model, activation and precision of an ONNX file that its folder's manifest lists (a model repository
    version); {} for any other file, whose model cannot be told from the file."""
    path = onnx_path.resolve()
    version_dir = path.parent
    if not (version_dir / MANIFEST_FILE).is_file() or not VERSION_PATTERN.fullmatch(version_dir.name):
        return {}
    manifest = ModelRepository(version_dir.parent.parent).load(
        version_dir.parent.name, int(version_dir.name), verify_files=False).manifest
    artifact = next((a for a in manifest.artifacts if a.file == path.name and a.format == "onnx"), None)
    if artifact is None:
        return {}
    return {"model": manifest.architecture, "activation": manifest.activation, "precision": artifact.precision}


def engine_labels(onnx_path: Path, precision: str | None) -> dict[str, str]:
    """repository_labels, with the precision --precision gives (a file outside a repository cannot tell it: the
    exporter keeps every variant's inputs fp32); a ValueError when it contradicts the file's manifest."""
    labels = repository_labels(onnx_path)
    if precision is None:
        return labels
    if labels.get("precision", precision) != precision:
        raise ValueError(f"--precision {precision}, but {onnx_path}'s manifest lists it as {labels['precision']}")
    return {**labels, "precision": precision}


def gpu_missing() -> str | None:
    """Why this host cannot run the GPU suite (no CUDA provider in onnxruntime, no TensorRT), or None."""
    import importlib.util

    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return (f"onnxruntime has no CUDAExecutionProvider here (has {ort.get_available_providers()}); "
                "run it on a GPU host in a venv with onnxruntime-gpu and not onnxruntime (bash scripts/gpu_check.sh "
                "makes one: pip install -e '.[serve,gpu,export,dev,bench]' --extra-index-url https://pypi.nvidia.com)")
    if importlib.util.find_spec("tensorrt") is None:
        return ("TensorRT's Python package is not installed; on the GPU host: pip install -e "
                "'.[serve,gpu,export,dev,bench]' --extra-index-url https://pypi.nvidia.com (or bash "
                "scripts/gpu_check.sh)")
    return None


def _existing_file(text: str) -> Path:
    if not Path(text).is_file():
        raise argparse.ArgumentTypeError(f"{text}: no such file (an ONNX file from `python -m export onnx`)")
    return Path(text)


def _load_url(text: str) -> str:
    """`bench load`'s URL, refused as a usage error before any payload is made (bench.loadgen.check_loopback)."""
    try:
        check_loopback(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return text


# Subcommands with flags of their own: main() hands them the rest of the command line; the parser only lists them.
DELEGATED_HELP = {
    "torch": "PyTorch CPU throughput table (bench.model_throughput; its flags follow)",
    "serve": "engine alone vs POST /classify at concurrency 1/8/32 (bench.serve_benchmark; its flags follow)",
    "cpu": "OpenVINO vs ONNX Runtime alone, decode fast vs exact (bench.cpu_engines)",
    "cpu-serving": "/classify vs the engine per CPU engine and decode mode, 12-MP uploads (bench.cpu_serving)",
    "soak": "fixed open-loop rate for minutes: latency drift and memory growth (bench.soak; its flags follow)",
    "roadmap": "every roadmap step's images/s per engine (CPU; --engines gpu: TensorRT) vs the paper's top-1 "
               "(bench.roadmap; flags follow)",
}


def get_args_parser() -> argparse.ArgumentParser:
    parser = CliParser(prog=PROG, description=__doc__)
    add_version_argument(parser)
    sub = parser.add_subparsers(dest="command", required=True)
    engine = sub.add_parser("engine", help="ONNX Runtime images/s and p50/p99 vs batch size for one ONNX file")
    engine.add_argument("onnx", type=_existing_file)
    engine.add_argument("--batch-sizes", type=positive_int, nargs="+", default=[1, 2, 4, 8, 16, 32])
    engine.add_argument("--provider", choices=["cpu", "cuda", "tensorrt"], default="cpu")
    engine.add_argument("--precision", choices=PRECISIONS, default=None,
                        help="the file's precision when no model repository manifest lists it (the row's label, and "
                             "TensorRT's precision flags)")
    engine.add_argument("--threads", type=positive_int, default=usable_cpus())
    engine.add_argument("--iterations", type=positive_int, default=30)
    load = sub.add_parser("load", help="HTTP load against a loopback URL (closed loop, or open loop with --rate)")
    load.add_argument("url", type=_load_url, help="http:// on 127.0.0.1, localhost or ::1")
    load.add_argument("--concurrency", type=positive_int, default=8)
    load.add_argument("--rate", type=positive_number, default=None, help="open loop: Poisson arrivals per second")
    load.add_argument("--requests", type=positive_int, default=None,
                      help=f"at most this many requests (closed loop: default {CLOSED_LOOP_REQUESTS}; open loop: "
                           "default no cap, arrivals for the whole --seconds)")
    load.add_argument("--seconds", type=positive_number, default=30.0,
                      help="at most this long (open loop: the arrival schedule's length)")
    load.add_argument("--form-field", default=None, help="send multipart with this field instead of a raw body")
    load.add_argument("--api-key", default=None, metavar="KEY",
                      help=f"sent as {API_KEY_HEADER} (default: ${API_KEY_VARIABLE}, the service's own variable, "
                           "which a process list does not show; never printed)")
    for name, text in DELEGATED_HELP.items():
        sub.add_parser(name, add_help=False, help=text)
    everything = sub.add_parser("all", help="engine sweep + GELU/ReLU + ConvNeXt/ResNet + service vs LitServe")
    everything.add_argument("--smoke", action="store_true", help="tiny configuration (convnext_atto, seconds)")
    everything.add_argument("--gpu", action="store_true",
                            help="engine sweep also on ORT's CUDA and TensorRT providers; service on CUDA")
    everything.add_argument("--no-peer", action="store_true", help="skip the LitServe peer")
    everything.add_argument("--threads", type=positive_int, default=usable_cpus())
    everything.add_argument("--out", type=Path, default=Path("bench-results"))
    return parser


# OSError: a missing file or a refused connection; RuntimeError: ONNX Runtime refusing a model file, or a load run
# with no success; RepositoryError: a model or version not in --repository.
@exit_on_expected_errors(PROG, (OSError, ValueError, RuntimeError, RepositoryError))
def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] in (["torch"], ["roadmap"]):
        # These two import torch (and model/), which no other subcommand needs: loaded only when asked for.
        if argv[0] == "torch":
            from bench.model_throughput import main as torch_main

            torch_main(argv[1:])
            return 0
        from bench.roadmap import main as roadmap_main

        return roadmap_main(argv[1:])
    subcommands = {"serve": serve_benchmark.main, "cpu": cpu_engines.main, "cpu-serving": cpu_serving.main,
                   "soak": soak.main}
    if argv[:1] and argv[0] in subcommands:
        return subcommands[argv[0]](argv[1:])
    args = get_args_parser().parse_args(argv)
    if args.command == "engine":
        host = host_line([args.provider])  # on every row: numbers from different machines are not comparable
        for r in benchmark_onnx(args.onnx, args.batch_sizes, provider=args.provider, threads=args.threads,
                                iterations=args.iterations, **engine_labels(args.onnx, args.precision)):
            print(json.dumps({k: v for k, v in asdict(r).items() if v is not None} | {"host": host}, allow_nan=False))
    elif args.command == "load":
        # The client's host: on loopback, the machine the server shares (its load average counts both).
        print(json.dumps(run_load(args).summary() | {"host": host_line(["cpu"])}, indent=2, allow_nan=False))
    else:
        preset = PRESETS["smoke" if args.smoke else "full"]
        preset = replace(preset, peer=preset.peer and not args.no_peer)
        providers = ["cpu", "cuda", "tensorrt"] if args.gpu else ["cpu"]
        if args.gpu:
            missing = gpu_missing()
            if missing:
                print(f"{prog_name(PROG)} all: error: --gpu: {missing}", file=sys.stderr)
                return 2
            preset = preset.on_gpu()
        results = run_all(preset, args.out, providers, args.threads)
        print((args.out / "report.md").read_text())
        print("wrote", ", ".join(results["files"].values()))
    return 0


if __name__ == "__main__":
    raise SystemExit(exit_status(main))
