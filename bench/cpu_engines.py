"""OpenVINO vs ONNX Runtime on this CPU, engine alone, in interleaved rounds; and JPEG decode cost, fast vs exact.

    python -m bench.cpu_engines engines [--repository R --model M] [--rounds 5] [--seconds 3] [--batch-size 8]
    python -m bench.cpu_engines decode [--repeats 7]

Every configuration runs once per round, in turn, so a neighbour's load hits all of them alike; the report gives
each one's median images/s over the rounds and the median of its per-round ratio to ONNX Runtime fp32. The engines
are the service's own classes (runtime/engines/), with the settings the service passes them. "2 in flight" runs
OpenVINO's THROUGHPUT hint with two infer requests at once, and ONNX Runtime with 2 streams (two batches at once on
one session, a thread each), each batch from its own thread: what the service's batcher feeds under
`openvino_performance_hint THROUGHPUT` / `ort_streams 2` (Engine.max_concurrent_batches batches in flight).
"""
from __future__ import annotations

import argparse
import io
import json
import os
import tempfile
import time
from pathlib import Path
from statistics import median

import numpy as np
from PIL import Image

from bench.host import cpu_model
from bench.loadgen import photo_paths
from export.onnx import export_onnx_version
from runtime.engines.auto import measure_images_per_s
from runtime.engines.onnxruntime import OnnxRuntimeEngine
from runtime.engines.openvino import OpenVinoEngine, artifact_precision
from runtime.preprocess import preprocess
from runtime.repository import ModelRepository, Preprocess

# (label, engine, precision, OpenVINO hint, batches in flight)
CONFIGS = (
    ("onnxruntime fp32", "onnxruntime", "fp32", None, 1),
    ("onnxruntime fp32, 2 streams, 2 in flight", "onnxruntime", "fp32", "THROUGHPUT", 2),
    ("openvino fp32 LATENCY", "openvino", "fp32", "LATENCY", 1),
    ("openvino fp32 THROUGHPUT", "openvino", "fp32", "THROUGHPUT", 1),
    ("openvino fp32 THROUGHPUT, 2 in flight", "openvino", "fp32", "THROUGHPUT", 2),
    ("openvino bf16 LATENCY", "openvino", "bf16", "LATENCY", 1),
    ("onnxruntime int8", "onnxruntime", "int8", None, 1),
    ("openvino int8 LATENCY", "openvino", "int8", "LATENCY", 1),
)
DECODE_SIZES = ((4000, 3000), (1920, 1440), (1024, 768), (500, 375))


def ort_streams(hint: str | None, threads: int) -> int:
    """ONNX Runtime's counterpart of OpenVINO's THROUGHPUT hint here: one stream (batch at a time) per thread."""
    return threads if hint == "THROUGHPUT" else 1


def build_engine(version, engine: str, precision: str, hint: str | None, max_batch_size: int, threads: int):
    manifest = version.manifest
    shape = (manifest.input.channels, manifest.input.height, manifest.input.width)
    if engine == "onnxruntime":  # hint THROUGHPUT: a stream per thread (the service's --ort-streams)
        path = version.artifact_path(manifest.find("onnx", precision))
        streams = ort_streams(hint, threads)
        return OnnxRuntimeEngine(path, shape, precision=precision, max_batch_size=max_batch_size,
                                 intra_op_threads=max(1, threads // streams), streams=streams)
    path = version.artifact_path(manifest.find("onnx", artifact_precision(precision)))
    return OpenVinoEngine(path, shape, precision=precision, max_batch_size=max_batch_size, threads=threads,
                          performance_hint=hint)


def images_per_s(engine, batch: np.ndarray, in_flight: int, seconds: float) -> float:
    """Batches for `seconds`: engine.run one after another, or from `in_flight` threads at once (the batcher's way):
    the measurement `--engine auto` makes."""
    return measure_images_per_s(engine, batch, seconds, in_flight)


def engine_rounds(version, configs, batch_size: int, rounds: int, seconds: float, threads: int) -> dict:
    engines = {}
    for label, engine, precision, hint, _ in configs:
        try:
            engines[label] = build_engine(version, engine, precision, hint, batch_size, threads)
            engines[label].load()
            engines[label].warmup()
        except (RuntimeError, AttributeError) as err:  # e.g. no int8 artifact, bf16 on a CPU without it
            print(f"skipped {label}: {err}")
            engines.pop(label, None)
    shape = engines[configs[0][0]].describe().input_shape
    batch = np.random.default_rng(0).standard_normal((batch_size, *shape), dtype=np.float32)
    runs = {label: [] for label in engines}
    for _ in range(rounds):
        for label, _, _, _, in_flight in configs:
            if label in engines:
                runs[label].append(images_per_s(engines[label], batch, in_flight, seconds))
    base = runs[configs[0][0]]
    results = {}
    for label, rates in runs.items():
        ratios = [r / b for r, b in zip(rates, base, strict=True)]
        # The per-round range shows how far a machine's drift moves one ratio (a shared VM: up to +-25%).
        results[label] = {"images_per_s": median(rates), "rounds": rates, "vs_onnxruntime_fp32": median(ratios),
                          "vs_onnxruntime_fp32_range": [min(ratios), max(ratios)]}
    return results


def photo_jpeg(size: tuple[int, int], quality: int = 90) -> bytes:
    """A real photo (scikit-image's astronaut) upscaled to `size`, as a phone would store it: baseline JPEG."""
    with Image.open(next(p for p in photo_paths() if p.name == "astronaut.png")) as image:
        picture = image.convert("RGB").resize(size, Image.Resampling.BICUBIC)
    buffer = io.BytesIO()
    picture.save(buffer, "JPEG", quality=quality)
    return buffer.getvalue()


def decode_costs(spec, repeats: int) -> list[dict]:
    """Decode + resize + crop + normalize per size (runtime.preprocess.preprocess), exact vs fast, median ms."""
    rows = []
    for size in DECODE_SIZES:
        payload = photo_jpeg(size)
        row = {"size": f"{size[0]}x{size[1]}", "kib": round(len(payload) / 1024)}
        for mode in ("exact", "fast"):
            times = []
            for _ in range(repeats):
                started = time.perf_counter()
                preprocess(payload, spec, 10**9, mode)
                times.append((time.perf_counter() - started) * 1000)
            row[f"{mode}_ms"] = median(times)
        row["exact_over_fast"] = row["exact_ms"] / row["fast_ms"]
        rows.append(row)
    return rows


def load_average() -> str:
    return "/".join(f"{x:.2f}" for x in os.getloadavg())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["engines", "decode"])
    parser.add_argument("--repository", type=Path, help="default: export a random-init convnext_tiny (fp32 + int8)")
    parser.add_argument("--model", default="convnext-tiny")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=3.0, help="per configuration per round")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--output", type=Path, default=None, help="also write the results as JSON here")
    args = parser.parse_args(argv)

    print(f"{cpu_model()}, {os.cpu_count()} cores, load average before {load_average()}")
    if args.what == "decode":
        # ConvNeXt-T's evaluation transform (224 crop, crop_pct 0.875 -> resize 256), as the repository writes it.
        spec = Preprocess(resize_px=256, crop_px=224, crop_pct=0.875, interpolation="bicubic",
                          mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
        result = decode_costs(spec, args.repeats)
        print("| JPEG | KiB | exact ms | fast ms | exact / fast |\n|---|---|---|---|---|")
        for r in result:
            print(f"| {r['size']} | {r['kib']} | {r['exact_ms']:.1f} | {r['fast_ms']:.1f} | "
                  f"{r['exact_over_fast']:.1f} |")
    else:
        with tempfile.TemporaryDirectory() as tmp:
            repository = args.repository
            if repository is None:
                repository = Path(tmp)
                export_onnx_version(repository, args.model, "convnext_tiny", precisions=("fp32", "int8"))
            version = ModelRepository(repository).load(args.model)
            result = engine_rounds(version, CONFIGS, args.batch_size, args.rounds, args.seconds, args.threads)
        print(f"\n{args.model}, batch {args.batch_size}, {args.threads} threads, {args.rounds} interleaved rounds of "
              f"{args.seconds:g} s\n\n| engine | images/s (median) | x ONNX Runtime fp32 (median of rounds) | "
              "per-round x |\n|---|---|---|---|")
        for label, r in result.items():
            low, high = r["vs_onnxruntime_fp32_range"]
            print(f"| {label} | {r['images_per_s']:.1f} | {r['vs_onnxruntime_fp32']:.2f} | {low:.2f}-{high:.2f} |")
    print(f"\nload average after {load_average()}")
    if args.output:
        args.output.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
