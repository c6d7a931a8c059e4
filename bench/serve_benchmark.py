"""ONNX Runtime CPU throughput of a model at the engine alone vs end to end through POST /classify (JPEG uploads).

    python -m bench.serve_benchmark [--repository models --model NAME] [--seconds 5] [--output serve_benchmark.json]

Without --repository, a random-init convnext_tiny is exported to a temporary repository (export extra needed).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.loadgen import closed_loop, jpeg_payloads
from bench.report import format_ms
from bench.server_process import service
from convnext_common import CliParser
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


def main(argv: list[str] | None = None) -> int:
    parser = CliParser(prog="python -m bench serve", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repository", type=Path, help="an existing model repository (default: export convnext_tiny)")
    parser.add_argument("--model", default="convnext_tiny", help="model name in the repository")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--seconds", type=float, default=5.0, help="seconds per measurement")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--max-batch-size", type=int, default=8)
    parser.add_argument("--output", type=Path, default=Path("serve_benchmark.json"))
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        repository = args.repository
        if repository is None:
            repository = Path(tmp)
            export_onnx_version(repository, args.model, "convnext_tiny")
        version = ModelRepository(repository).load(args.model)
        engine = engine_throughput(version, args.batch_sizes, args.seconds, args.threads)
        payloads = jpeg_payloads()
        with service(["--repository", str(repository), "--model", args.model, "--intra-op-threads",
                      str(args.threads), "--max-batch-size", str(args.max_batch_size)]) as server:
            end_to_end = [asyncio.run(load(server.url, payloads, c, args.seconds)) for c in args.concurrency]
    best = max(engine.values())
    report = {"model": args.model, "threads": args.threads, "engine_images_per_s": engine,
              "engine_best_images_per_s": best, "end_to_end": end_to_end,
              "end_to_end_over_engine": max(r["images_per_s"] for r in end_to_end) / best}
    print(f"## {args.model}: ONNX Runtime CPU, {args.threads} threads\n")
    print("| engine batch | images/s |\n|---|---|")
    for size, rate in engine.items():
        print(f"| {size} | {rate:.1f} |")
    print("\n| /classify concurrency | images/s | p50 ms | p99 ms | errors |\n|---|---|---|---|---|")
    for r in end_to_end:
        print(f"| {r['concurrency']} | {r['images_per_s']:.1f} | {format_ms(r['p50_ms'])} | {format_ms(r['p99_ms'])} | "
              f"{r['errors']} |")
    print(f"\nend-to-end best / engine best: {report['end_to_end_over_engine']:.2f}")
    args.output.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
