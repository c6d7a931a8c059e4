"""POST /classify vs the engine it serves, per CPU engine and decode mode: images/s at concurrency 8 and 32 (real
JPEGs, mixed sizes), a lone request's overhead, and 12-megapixel uploads (a real photo upscaled, and a mosaic of real
photos at their native resolution: the realistic one, bench/cpu_engines.photo_mosaic_jpeg).

    python -m bench.cpu_serving [--repository R --model M | --architecture A] [--seconds 15]
        [--max-batch-size 8] [--output x.json]

For each configuration (engine, precision, decode mode), in this order: the engine alone (the service's own engine
class and settings, in this process: images/s at max_batch_size, p50 ms at batch 1), then the service in a
subprocess on the same threads. Efficiency = /classify images/s / the engine alone's images/s. A lone request's
overhead = the median, over its requests, of client latency - that request's preprocessing - its batch-1 inference,
both as the service timed them (the response's timings; bench/lone_request.py). The served engine's batch-1 time, not
the engine alone's: between lone requests the engine's threads go idle, which a hot loop in another process does not
show (both are reported). The table prints the service's preprocessing (what the overhead subtracts) beside this
process's own one-thread timing of the same images, which runs on warm caches and is not part of the overhead.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path
from statistics import median

import numpy as np

from bench import cpu_engines
from bench.host import cores_description, cpu_model, host_description
from bench.http_client import run_client
from bench.loadgen import PAYLOAD_SIZES, closed_loop, jpeg_payloads
from bench.lone_request import lone_requests
from bench.report import format_ms, pyplot, save_figure
from bench.server_process import measurement_pins, service
from convnext_common import CliParser, add_version_argument, positive_int, positive_number, usable_cpus
from convnext_files import write_text_atomic
from export.onnx import export_onnx_version
from runtime.engines.openvino import cpu_supports_bf16
from runtime.preprocess import preprocess
from runtime.repository import ModelRepository

# (engine, precision, decode mode, OpenVINO performance hint): today's default path first, then what this CPU allows.
# THROUGHPUT: the batcher keeps the engine's optimal number of batches in flight, and the engine alone is timed the
# same way (that many infer requests kept busy).
# ONNX Runtime "THROUGHPUT": --ort-streams = the thread count, a batch per thread (bench/cpu_engines.ort_streams).
SERVICES = (("onnxruntime", "fp32", "exact", "LATENCY"), ("onnxruntime", "fp32", "exact", "THROUGHPUT"),
            ("openvino", "fp32", "exact", "LATENCY"), ("openvino", "fp32", "fast", "LATENCY"),
            ("openvino", "fp32", "fast", "THROUGHPUT"), ("onnxruntime", "fp32", "fast", "LATENCY"),
            ("onnxruntime", "fp32", "fast", "THROUGHPUT"), ("openvino", "bf16", "fast", "LATENCY"))
PHONE_SIZE = cpu_engines.PHONE_SIZE
# 12-MP uploads: the upscaled astronaut (as runs before session 16 sent) and the mosaic of native-resolution photos.
PHONE_SETS = {"phone": "upscaled", "phone_native": "native-resolution mosaic"}
UNKNOWN_CPU = "CPU unknown (not recorded in this JSON)"
# The load client runs on this host: under load it takes CPU from the service, while the engine ran alone.
SHARED_CPU_NOTE = ("/classify rates were measured with the load client on this host, sharing its CPU with the "
                   "service; the engine alone ran with no client running")


def engine_alone(version, engine: str, precision: str, hint: str, max_batch_size: int, threads: int,
                 seconds: float) -> dict:
    runner = cpu_engines.build_engine(version, engine, precision, hint, max_batch_size, threads)
    runner.load()
    runner.warmup()
    shape = runner.describe().input_shape
    batch = np.random.default_rng(0).standard_normal((max_batch_size, *shape), dtype=np.float32)
    rate = cpu_engines.images_per_s(runner, batch, runner.max_concurrent_batches, seconds)
    one, latencies = batch[:1], []
    deadline = time.perf_counter() + seconds / 2
    while time.perf_counter() < deadline:
        started = time.perf_counter()
        runner.run(one)
        latencies.append((time.perf_counter() - started) * 1000)
    runner.close()
    return {"images_per_s": rate, "batch1_p50_ms": median(latencies)}


def preprocess_ms(payloads: list[bytes], spec, mode: str, repeats: int = 5) -> float:
    times = []
    for payload in payloads:
        for _ in range(repeats):
            started = time.perf_counter()
            preprocess(payload, spec, 10**9, mode)
            times.append((time.perf_counter() - started) * 1000)
    return median(times)


def service_args(repository: Path, model: str, config: tuple[str, str, str, str], threads: int,
                 max_batch_size: int) -> list[str]:
    """`python -m service` flags for one configuration, on the settings its engine alone was timed with (ORT's
    streams, spinning on as the engine class's default), every measured setting pinned against CONVNEXT_*."""
    engine, precision, mode, hint = config
    streams = cpu_engines.ort_streams(hint if engine == "onnxruntime" else None, threads)
    return ["--repository", str(repository), "--model", model, "--engine", engine, "--provider", "cpu",
            "--precision", precision, "--intra-op-threads", str(threads), "--max-batch-size", str(max_batch_size),
            "--openvino-performance-hint", hint, *measurement_pins(decode_mode=mode, ort_streams=streams)]


def service_runs(repository: Path, model: str, config: tuple[str, str, str, str], args, payloads: dict) -> dict:
    out = {}
    with service(service_args(repository, model, config, args.threads, args.max_batch_size)) as server:
        url = server.url
        for concurrency in (8, 32):
            result = run_client(closed_loop(f"{url}/classify", payloads["mixed"], concurrency, 10**9, args.seconds,
                                            steady=True))
            out[f"c{concurrency}"] = result.summary()
        out["lone"] = {size: lone_requests(f"{url}/classify", items, args.lone_requests)
                       for size, items in payloads["by_size"].items()}
        for name in PHONE_SETS:
            result = run_client(closed_loop(f"{url}/classify", payloads[name], 8, 10**9, args.seconds, steady=True))
            out[f"{name}_c8"] = result.summary()
    return out


def payload_sets() -> dict:
    """Mixed 500x375 and 1024x768 JPEGs, each size alone, and the two 12-MP sets (PHONE_SETS), three files each."""
    qualities = (85, 90, 95)
    return {"mixed": jpeg_payloads(),
            "by_size": {f"{w}x{h}": jpeg_payloads(sizes=((w, h),)) for w, h in PAYLOAD_SIZES},
            "phone": [cpu_engines.photo_jpeg(PHONE_SIZE, quality) for quality in qualities],
            "phone_native": [cpu_engines.photo_mosaic_jpeg(PHONE_SIZE, quality, first=index)
                             for index, quality in enumerate(qualities)]}


def measure(version, repository: Path, model: str, args) -> list[dict]:
    import openvino as ov

    payloads = payload_sets()
    spec = version.manifest.preprocess
    # Each row says where and what it measured, so that --from-json plots it under its own CPU, not the replotter's.
    run = {"cpu": f"{cpu_model()}, {cores_description()}", "architecture": version.manifest.architecture,
           "max_batch_size": args.max_batch_size, "threads": args.threads}
    rows = []
    for config in SERVICES:
        if config[1] == "bf16" and not cpu_supports_bf16(ov.Core()):
            continue
        alone = engine_alone(version, config[0], config[1], config[3], args.max_batch_size, args.threads,
                             args.seconds)
        served = service_runs(repository, model, config, args, payloads)
        row = {"engine": config[0], "precision": config[1], "decode_mode": config[2], "hint": config[3],
               **run, "alone": alone, **served}
        for c in ("c8", "c32"):
            row[f"{c}_efficiency"] = served[c]["images_per_s"] / alone["images_per_s"]
        for size, lone in served["lone"].items():
            lone["preprocess_ms"] = preprocess_ms(payloads["by_size"][size], spec, config[2])
            lone["overhead_ms"] = lone["overhead_p50_ms"]  # per request, with the service's own preprocess timing
        for name in PHONE_SETS:
            row[f"{name}_preprocess_ms"] = preprocess_ms(payloads[name], spec, config[2], repeats=2)
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k not in ("c8", "c32", "phone_c8", "phone_native_c8", *run)}),
              flush=True)
    return rows


def label(row: dict) -> str:
    """engine precision, and the performance hint for OpenVINO (streams for ONNX Runtime)."""
    hint = [row["hint"]] if row["engine"] == "openvino" else ["streams"] if row["hint"] == "THROUGHPUT" else []
    return " ".join([row["engine"], row["precision"], *hint])


def print_tables(rows: list[dict]) -> None:
    print(f"\n{SHARED_CPU_NOTE}.")
    print("\n12-MP uploads: 4000x3000 JPEGs (q85/90/95), the upscaled astronaut photo / a mosaic of real photos at "
          "their native resolution (the realistic one: an upscaled photo has less detail to decode).")
    print("\n| engine | decode | alone img/s (bs max) | /classify c8 | c32 | c8 / alone | c32 / alone | "
          "12-MP uploads c8 img/s, upscaled / mosaic | 12-MP preprocess ms, upscaled / mosaic | "
          "errors c8 / c32 / 12-MP upscaled / mosaic |\n|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        uploads = " / ".join(f"{r[f'{name}_c8']['images_per_s']:.1f}" if f"{name}_c8" in r else "-"
                             for name in PHONE_SETS)
        preprocess = " / ".join(f"{r[f'{name}_preprocess_ms']:.1f}" if f"{name}_preprocess_ms" in r else "-"
                                for name in PHONE_SETS)
        print(f"| {label(r)} | {r['decode_mode']} | "
              f"{r['alone']['images_per_s']:.1f} | "
              f"{r['c8']['images_per_s']:.1f} | {r['c32']['images_per_s']:.1f} | {r['c8_efficiency']:.2f} | "
              f"{r['c32_efficiency']:.2f} | {uploads} | {preprocess} | {errors_cell(r)} |")
    print("\nA lone request: overhead = median of (client latency - served preprocessing - served batch-1 inference) "
          "per request, so the medians beside it add up to it only roughly; the one-thread preprocessing is this "
          "process's (warm caches), not part of it.")
    print("\n| engine | decode | JPEG | client p50 ms | served bs1 inference ms | engine bs1 alone ms | "
          "served preprocess ms | preprocess ms (one thread, bench) | overhead ms |"
          "\n|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        for size, lone in r["lone"].items():
            served = lone.get("served_preprocess_p50_ms")  # not in runs that predate it
            print(f"| {label(r)} | {r['decode_mode']} | {size} | "
                  f"{lone['client_p50_ms']:.1f} | {lone['inference_p50_ms']:.1f} | "
                  f"{r['alone']['batch1_p50_ms']:.1f} | {format_ms(served)} | "
                  f"{lone['preprocess_ms']:.1f} | {format_ms(lone['overhead_ms'])} |")


def errors_cell(row: dict) -> str:
    """Failed requests per load run of a row (any status but 200, timeouts, broken connections): a rate beside them
    counts successes only. "-" for a run the row lacks or one recorded without its errors."""
    runs = ("c8", "c32", *(f"{name}_c8" for name in PHONE_SETS))
    return " / ".join(str(sum(row[run]["errors"].values())) if "errors" in row.get(run, {}) else "-" for run in runs)


def with_run_facts(rows: list[dict], architecture: str, max_batch_size: int) -> list[dict]:
    """Rows of an older --output, which did not record where and what they measured: the CPU unknown (not this
    machine's), the architecture and max batch size as the command line gives them."""
    return [{"cpu": UNKNOWN_CPU, "architecture": architecture, "max_batch_size": max_batch_size, **row}
            for row in rows]


def save_plot(rows: list[dict], path: Path) -> Path:
    """Images/s per configuration: the engine alone, /classify at 8 and 32 clients, and 12-MP uploads at 8."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(11, 5))
    run = rows[0]
    bars = (("alone", f"engine alone, batch {run['max_batch_size']}"), ("c8", "/classify, 8 clients"),
            ("c32", "/classify, 32 clients"), ("phone_c8", "/classify, 12-MP uploads (upscaled), 8 clients"),
            ("phone_native_c8", "/classify, 12-MP uploads (native-resolution mosaic), 8 clients"))
    bars = tuple((key, title) for key, title in bars if all(key in r for r in rows))  # older runs: no mosaic
    width = 0.8 / len(bars)
    for index, (key, title) in enumerate(bars):
        ax.bar([i + index * width for i in range(len(rows))], [r[key]["images_per_s"] for r in rows], width,
               label=title)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(rows))],
                  [f"{label(r)}\n{r['decode_mode']} decode" for r in rows], fontsize=8)
    ax.set_ylabel("images/s")
    ax.set_title(f"{run['architecture']} on {run['cpu']}: /classify vs the engine it serves", fontsize=9)
    ax.legend(fontsize=8)
    return save_figure(fig, path)


def get_args_parser() -> argparse.ArgumentParser:
    parser = CliParser(prog="python -m bench cpu-serving", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    add_version_argument(parser)
    parser.add_argument("--repository", type=Path, help="default: export a random-init convnext_tiny")
    parser.add_argument("--model", default="convnext-tiny")
    parser.add_argument("--architecture", default="convnext_tiny", help="what to export without --repository "
                        "(and, with --from-json, the plot's title when that JSON did not record it)")
    parser.add_argument("--seconds", type=positive_number, default=15.0,
                        help="per load level, and for the engine alone")
    parser.add_argument("--lone-requests", type=positive_int, default=30)
    parser.add_argument("--threads", type=positive_int, default=usable_cpus())
    parser.add_argument("--max-batch-size", type=positive_int, default=8,
                        help="the service's (and, with --from-json, the plot's when that JSON did not record it)")
    parser.add_argument("--output", type=Path, default=Path("cpu_serving.json"))
    parser.add_argument("--plot", type=Path, default=None, help="also save the images/s bar chart (PNG) here")
    parser.add_argument("--from-json", type=Path, default=None, help="print and plot an earlier run's --output")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = get_args_parser()
    args = parser.parse_args(argv)
    if args.from_json is not None:
        rows = with_run_facts(json.loads(args.from_json.read_text()), args.architecture, args.max_batch_size)
        print(rows[0]["cpu"] if rows else UNKNOWN_CPU)
        print_tables(rows)
        if args.plot:
            save_plot(rows, args.plot)
        return 0
    print(f"{host_description()}, {args.threads} threads, load average before {os.getloadavg()}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        repository = args.repository
        if repository is None:
            repository = Path(tmp)
            export_onnx_version(repository, args.model, args.architecture)
        rows = measure(ModelRepository(repository).load(args.model), repository, args.model, args)
    print_tables(rows)
    print(f"\nload average after {os.getloadavg()}")
    # The results first: minutes of measuring are kept even if the plot fails (redraw it with --from-json).
    write_text_atomic(args.output, json.dumps(rows, indent=2))
    if args.plot:
        save_plot(rows, args.plot)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
