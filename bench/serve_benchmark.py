"""ONNX Runtime CPU throughput of a model at the engine alone vs end to end through POST /classify (JPEG uploads).

    python -m bench.serve_benchmark [--repository models --model NAME] [--seconds 5] [--output serve_benchmark.json]

Without --repository, the architecture --model names (default convnext_tiny) is exported with random weights to a
temporary repository (export extra needed). The service is started on the engine timed alone (ONNX Runtime CPU fp32,
one stream, ORT spinning on, exact decoding), whatever CONVNEXT_* variables say; "engine best" is over the batch
sizes the service can run (<= --max-batch-size).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.host import host_description
from bench.loadgen import closed_loop, jpeg_payloads
from bench.report import format_ms
from bench.server_process import measurement_pins, service
from convnext_common import CliParser, add_version_argument, positive_int, positive_number, usable_cpus
from convnext_files import write_text_atomic
from export.onnx import export_onnx_version
from runtime.engines.onnxruntime import OnnxRuntimeEngine
from runtime.repository import ModelRepository


def engine_throughput(version, batch_sizes, seconds: float, threads: int) -> dict[int, float]:
    manifest = version.manifest
    shape = (manifest.input.channels, manifest.input.height, manifest.input.width)
    engine = OnnxRuntimeEngine(version.artifact_path(manifest.find("onnx", "fp32")), shape,
                               max_batch_size=max(batch_sizes), intra_op_threads=threads)
    engine.load()
    results = {}
    for size in batch_sizes:
        batch = np.random.default_rng(0).standard_normal((size, *shape), dtype=np.float32)
        engine.run(batch)  # warm-up
        images, started = 0, time.perf_counter()
        while time.perf_counter() - started < seconds:
            engine.run(batch)
            images += size
        results[size] = images / (time.perf_counter() - started)
    engine.close()
    return results


async def load(url: str, payloads: list[bytes], concurrency: int, seconds: float) -> dict:
    result = (await closed_loop(f"{url}/classify", payloads, concurrency, 10**9, seconds)).summary()
    return {"concurrency": concurrency, "images_per_s": result["images_per_s"],
            "errors": sum(result["errors"].values()), "p50_ms": result["p50_ms"], "p99_ms": result["p99_ms"],
            "requests": result["ok"]}


def service_args(repository: Path, model: str, threads: int, max_batch_size: int) -> list[str]:
    """`python -m service` flags for the engine engine_throughput times, each pinned so that a CONVNEXT_* variable in
    the environment (CONVNEXT_ENGINE=openvino, CONVNEXT_DECODE_MODE=fast, ...) cannot change what is compared."""
    return ["--repository", str(repository), "--model", model, "--engine", "onnxruntime", "--provider", "cpu",
            "--precision", "fp32", *measurement_pins(), "--intra-op-threads", str(threads),
            "--max-batch-size", str(max_batch_size)]


def engine_best(engine: dict[int, float], max_batch_size: int) -> tuple[int, float]:
    """(batch size, images/s) of the engine's best batch among those a service of max_batch_size runs."""
    return max(((size, rate) for size, rate in engine.items() if size <= max_batch_size), key=lambda item: item[1])


def get_args_parser() -> argparse.ArgumentParser:
    parser = CliParser(prog="python -m bench serve", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    add_version_argument(parser)
    parser.add_argument("--repository", type=Path, help="an existing model repository (default: export convnext_tiny)")
    parser.add_argument("--model", default="convnext_tiny", help="model name in --repository; without one, the "
                        "architecture to export (random weights) under that name")
    parser.add_argument("--batch-sizes", type=positive_int, nargs="+", default=[1, 2, 4, 8, 16])
    parser.add_argument("--concurrency", type=positive_int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--seconds", type=positive_number, default=5.0, help="seconds per measurement")
    parser.add_argument("--threads", type=positive_int, default=usable_cpus())
    parser.add_argument("--max-batch-size", type=positive_int, default=8)
    parser.add_argument("--output", type=Path, default=Path("serve_benchmark.json"))
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = get_args_parser()
    args = parser.parse_args(argv)
    if min(args.batch_sizes) > args.max_batch_size:
        parser.error(f"no --batch-sizes value is <= --max-batch-size {args.max_batch_size}: nothing to compare the "
                     "service with")
    host = host_description()
    print(f"{host}, {args.threads} threads", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        repository = args.repository
        if repository is None:
            repository = Path(tmp)
            export_onnx_version(repository, args.model, args.model)
        version = ModelRepository(repository).load(args.model)
        engine = engine_throughput(version, args.batch_sizes, args.seconds, args.threads)
        payloads = jpeg_payloads()
        with service(service_args(repository, args.model, args.threads, args.max_batch_size)) as server:
            end_to_end = [asyncio.run(load(server.url, payloads, c, args.seconds)) for c in args.concurrency]
    best_batch, best = engine_best(engine, args.max_batch_size)
    report = {"model": args.model, "host": host, "threads": args.threads, "max_batch_size": args.max_batch_size,
              "engine_images_per_s": engine, "engine_best_batch_size": best_batch, "engine_best_images_per_s": best,
              "end_to_end": end_to_end, "end_to_end_over_engine": max(r["images_per_s"] for r in end_to_end) / best}
    print(f"## {args.model}: ONNX Runtime CPU fp32, {args.threads} threads\n")
    print("| engine batch | images/s |\n|---|---|")
    for size, rate in engine.items():
        print(f"| {size} | {rate:.1f} |")
    print("\n| /classify concurrency | images/s | p50 ms (200s) | p99 ms (200s) | errors |\n|---|---|---|---|---|")
    for r in end_to_end:
        print(f"| {r['concurrency']} | {r['images_per_s']:.1f} | {format_ms(r['p50_ms'])} | {format_ms(r['p99_ms'])} | "
              f"{r['errors']} |")
    print(f"\nend-to-end best / engine best at a batch the service runs (batch {best_batch}): "
          f"{report['end_to_end_over_engine']:.2f}")
    write_text_atomic(args.output, json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
