"""OpenVINO vs ONNX Runtime on this CPU, engine alone, in interleaved rounds; and JPEG decode cost, fast vs exact.

    python -m bench.cpu_engines engines [--repository R --model M] [--rounds 5] [--seconds 3] [--batch-size 8]
    python -m bench.cpu_engines decode [--repeats 7]

Every configuration runs once per round, in turn, so a neighbour's load hits all of them alike; the report gives
each one's median images/s over the rounds and the median of its per-round ratio to ONNX Runtime fp32. The engines
are the service's own classes (runtime/engines/), with the settings the service passes them. "N in flight" runs
OpenVINO's THROUGHPUT hint with its optimal number of infer requests at once, and ONNX Runtime with a stream per
thread (that many batches at once on one session), each batch from its own thread: what the service's batcher feeds
under `openvino_performance_hint THROUGHPUT` / `ort_streams N` (Engine.max_concurrent_batches batches in flight); the
label gives the numbers this host ran with.

Decode inputs: the astronaut photo (512 px) upscaled to every size from 12 MP down to 500x375, and at 12 MP also a
mosaic of the real photos at their native resolution (no real 12-MP photo ships with the packages here). An upscaled
file has little of a real photo's fine detail: less entropy to decode and less for a DCT-reduced decode to drop, so
its exact / fast ratio flatters fast mode; the mosaic's is the realistic one.

The ceiling: each round also times this machine's fp32 matrix product (NumPy's BLAS, 2048 x 2048, the same
threads), and each engine's rate in model FLOPs (2 per multiply-accumulate, counted by model.flops) is given as a
fraction of that round's GEMM rate. ConvNeXt-T spends 93% of its MACs in its pointwise (1x1) layers, plain GEMMs,
so an fp32 engine cannot go much past 1.0 of it: one fp32 engine's lead over another is bounded by how close the
other already is.
"""
from __future__ import annotations

import argparse
import functools
import io
import json
import os
import tempfile
import time
from pathlib import Path
from statistics import median

import numpy as np
from PIL import Image
from threadpoolctl import threadpool_limits  # scikit-learn's dependency (the bench extra)

from bench.host import cores_description, cpu_model
from bench.loadgen import photo_paths
from bench.preprocess_cost import median_ms
from convnext_common import CliParser, add_version_argument, positive_int, positive_number, usable_cpus
from convnext_files import write_text_atomic
from export.onnx import export_onnx_version
from runtime.decode import FAST_DECODE_HEADROOM
from runtime.engines.auto import measure_images_per_s
from runtime.engines.onnxruntime import OnnxRuntimeEngine
from runtime.engines.openvino import OpenVinoEngine, artifact_precision
from runtime.preprocess import preprocess
from runtime.repository import ModelRepository, Preprocess

# (label, engine, precision, OpenVINO hint, batches in flight). In flight None: the engine's max_concurrent_batches,
# as the service's batcher keeps; the label's {streams} and {in_flight} are filled in once the engine is loaded.
CONFIGS = (
    ("onnxruntime fp32", "onnxruntime", "fp32", None, 1),
    ("onnxruntime fp32, {streams} streams, {in_flight} in flight", "onnxruntime", "fp32", "THROUGHPUT", None),
    ("openvino fp32 LATENCY", "openvino", "fp32", "LATENCY", 1),
    ("openvino fp32 THROUGHPUT", "openvino", "fp32", "THROUGHPUT", 1),
    ("openvino fp32 THROUGHPUT, {in_flight} in flight", "openvino", "fp32", "THROUGHPUT", None),
    ("openvino bf16 LATENCY", "openvino", "bf16", "LATENCY", 1),
    ("onnxruntime int8", "onnxruntime", "int8", None, 1),
    ("openvino int8 LATENCY", "openvino", "int8", "LATENCY", 1),
)
PHONE_SIZE = (4000, 3000)  # 12 MP, 4:3: a phone camera's photo
DECODE_SIZES = (PHONE_SIZE, (1920, 1440), (1024, 768), (500, 375))
# What each decode row's JPEG is: the astronaut upscaled (every size), and at 12 MP also the real photos tiled at
# their native resolution. No real 12-MP photo ships with the packages here (the largest is 1411 px).
UPSCALED, MOSAIC = "upscaled photo", "native-resolution mosaic"
GEMM_SIZE = 2048
GEMM_LABEL = "fp32 GEMM (NumPy BLAS)"


def ort_streams(hint: str | None, threads: int) -> int:
    """ONNX Runtime's counterpart of OpenVINO's THROUGHPUT hint here: one stream (batch at a time) per thread."""
    return threads if hint == "THROUGHPUT" else 1


def onnx_artifact_path(version, precision: str) -> Path:
    """The version's ONNX file of `precision`; a RuntimeError naming the precisions it has when it lacks that one."""
    manifest = version.manifest
    artifact = manifest.find("onnx", precision)
    if artifact is None:
        has = ", ".join(a.precision for a in manifest.artifacts if a.format == "onnx") or "none"
        raise RuntimeError(f"no {precision} ONNX artifact in {manifest.name}/{manifest.version} (has {has})")
    return version.artifact_path(artifact)


def build_engine(version, engine: str, precision: str, hint: str | None, max_batch_size: int, threads: int):
    manifest = version.manifest
    shape = (manifest.input.channels, manifest.input.height, manifest.input.width)
    if engine == "onnxruntime":  # hint THROUGHPUT: a stream per thread (the service's --ort-streams)
        path = onnx_artifact_path(version, precision)
        streams = ort_streams(hint, threads)
        return OnnxRuntimeEngine(path, shape, precision=precision, max_batch_size=max_batch_size,
                                 intra_op_threads=max(1, threads // streams), streams=streams)
    path = onnx_artifact_path(version, artifact_precision(precision))
    return OpenVinoEngine(path, shape, precision=precision, max_batch_size=max_batch_size, threads=threads,
                          performance_hint=hint)


def images_per_s(engine, batch: np.ndarray, in_flight: int, seconds: float) -> float:
    """Batches for `seconds`: engine.run one after another, or from `in_flight` threads at once (the batcher's way):
    the measurement `--engine auto` makes."""
    return measure_images_per_s(engine, batch, seconds, in_flight)


def fp32_gemm_gflops(threads: int, seconds: float) -> float:
    """This machine's fp32 matrix-product rate now, in GFLOPS: NumPy's BLAS on 2048 x 2048 operands with `threads`
    threads, the best call within `seconds` (at least three calls)."""
    rng = np.random.default_rng(0)
    a, b = (rng.standard_normal((GEMM_SIZE, GEMM_SIZE), dtype=np.float32) for _ in range(2))
    out = np.empty_like(a)
    best, calls, deadline = float("inf"), 0, time.perf_counter() + seconds
    with threadpool_limits(limits=threads, user_api="blas"):
        np.matmul(a, b, out=out)  # warm-up: the BLAS threads start
        while calls < 3 or time.perf_counter() < deadline:
            started = time.perf_counter()
            np.matmul(a, b, out=out)
            best, calls = min(best, time.perf_counter() - started), calls + 1
    return 2 * GEMM_SIZE**3 / best / 1e9


def model_macs(version) -> int | None:
    """Multiply-accumulates per image of the repository model's architecture (model.flops), None when it is not one
    this project builds (an imported ONNX file) or torch is not installed (model/ counts with it)."""
    try:
        from model.flops import measure  # torch: only here, for the ceiling
    except ImportError:
        return None
    manifest = version.manifest
    try:
        return measure(manifest.architecture, manifest.input.height, num_classes=manifest.num_classes).macs
    except (ValueError, KeyError, TypeError):
        return None


def engine_rounds(version, configs, batch_size: int, rounds: int, seconds: float, threads: int) -> dict:
    engines: dict = {}  # label (with this host's numbers) -> the loaded engine
    in_flight: dict[str, int] = {}
    for template, engine, precision, hint, wanted in configs:
        try:
            runner = build_engine(version, engine, precision, hint, batch_size, threads)
            runner.load()
            runner.warmup()
        except RuntimeError as err:  # e.g. no int8 artifact, bf16 on a CPU without it
            print(f"skipped {template.format(streams='N', in_flight='N')}: {err}")
            continue
        batches = wanted or runner.max_concurrent_batches
        label = template.format(streams=runner.max_concurrent_batches, in_flight=batches)
        engines[label], in_flight[label] = runner, batches
    base_label = configs[0][0]  # every ratio is against the first configuration (ONNX Runtime fp32)
    if base_label not in engines:
        raise RuntimeError(f"{base_label}, the configuration every other is compared with, did not load")
    shape = engines[base_label].describe().input_shape
    batch = np.random.default_rng(0).standard_normal((batch_size, *shape), dtype=np.float32)
    runs: dict[str, list[float]] = {label: [] for label in engines}
    gemm: list[float] = []
    for _ in range(rounds):
        gemm.append(fp32_gemm_gflops(threads, min(seconds, 2.0)))
        for label, runner in engines.items():
            runs[label].append(images_per_s(runner, batch, in_flight[label], seconds))
    base = runs[base_label]
    results = {}
    for label, rates in runs.items():
        ratios = [r / b for r, b in zip(rates, base, strict=True)]
        # The per-round range shows how far a machine's drift moves one ratio (a shared VM: up to +-25%).
        results[label] = {"images_per_s": median(rates), "rounds": rates, "vs_onnxruntime_fp32": median(ratios),
                          "vs_onnxruntime_fp32_range": [min(ratios), max(ratios)]}
    macs = model_macs(version)
    results[GEMM_LABEL] = {"gflops": median(gemm), "rounds": gemm, "gflops_range": [min(gemm), max(gemm)],
                           "macs_per_image": macs}
    if macs is not None:
        for label in runs:  # each round's model FLOPs over that round's GEMM rate: the VM's drift moves both
            gflops = [rate * 2 * macs / 1e9 for rate in runs[label]]
            results[label]["gflops"] = median(gflops)
            results[label]["of_fp32_gemm"] = median(g / peak for g, peak in zip(gflops, gemm, strict=True))
    return results


def photo_jpeg(size: tuple[int, int], quality: int = 90) -> bytes:
    """A real photo (scikit-image's astronaut, 512 px) upscaled to `size`, stored as a phone would: baseline JPEG.
    Upscaled, it lacks the fine detail of a photo taken at that size (photo_mosaic_jpeg has it)."""
    with Image.open(next(p for p in photo_paths() if p.name == "astronaut.png")) as image:
        picture = image.convert("RGB").resize(size, Image.Resampling.BICUBIC)
    return _jpeg(picture, quality)


def photo_mosaic_jpeg(size: tuple[int, int], quality: int = 90, first: int = 0) -> bytes:
    """`size` tiled with the real photos (bench.loadgen.photo_paths) at their native resolution, none scaled: each is
    cut to the shortest one's height (a centred band) and they follow each other along rows, every row starting one
    photo later (`first`: the photo the first row starts with). A baseline JPEG with photo detail at every scale, as a
    12-MP phone photo has, where an upscaled small photo has little: less entropy to decode, and less detail for a
    DCT-reduced decode to leave out."""
    photos = []
    for path in photo_paths():
        with Image.open(path) as image:
            photos.append(image.convert("RGB"))
    tile_px = min(photo.height for photo in photos)
    bands = [photo.crop((0, (photo.height - tile_px) // 2, photo.width, (photo.height - tile_px) // 2 + tile_px))
             for photo in photos]
    canvas = Image.new("RGB", size)
    for row, top in enumerate(range(0, size[1], tile_px)):
        left, index = 0, first + row
        while left < size[0]:
            band = bands[index % len(bands)]
            canvas.paste(band, (left, top))
            left, index = left + band.width, index + 1
    return _jpeg(canvas, quality)


def _jpeg(picture: Image.Image, quality: int) -> bytes:
    buffer = io.BytesIO()
    picture.save(buffer, "JPEG", quality=quality)
    return buffer.getvalue()


def decode_at_one_eighth(payload: bytes) -> Image.Image:
    """The least work any reduced JPEG decode does: the whole file's entropy decoding, then only each block's DC
    coefficient (libjpeg's 1/8 scale). No fast decode of this file can take less."""
    with Image.open(io.BytesIO(payload)) as image:
        image.draft(image.mode, (image.width // 8, image.height // 8))
        image.load()
        return image


def decode_inputs() -> list[tuple[tuple[int, int], str, bytes]]:
    """(size, what it is, JPEG q90) per decode row: the upscaled astronaut at every size, then the 12-MP mosaic of
    native-resolution photos, the realistic 12-MP input of the two."""
    return ([(size, UPSCALED, photo_jpeg(size)) for size in DECODE_SIZES]
            + [(PHONE_SIZE, MOSAIC, photo_mosaic_jpeg(PHONE_SIZE))])


def decode_costs(spec, repeats: int) -> list[dict]:
    """Decode + resize + crop + normalize per input (runtime.preprocess.preprocess), median ms: exact; fast with the
    service's default headroom (fast_ms) and with headroom 1, the least decoding work (fast_h1_ms: 12-MP photos at
    1/8 scale); and the floor under any reduced decode (decode_at_one_eighth): exact / floor is the most a fast mode
    could gain."""
    rows = []
    for size, source, payload in decode_inputs():
        row = {"size": f"{size[0]}x{size[1]}", "input": source, "kib": round(len(payload) / 1024)}
        for key, mode, headroom in (("exact", "exact", FAST_DECODE_HEADROOM), ("fast", "fast", FAST_DECODE_HEADROOM),
                                    ("fast_h1", "fast", 1.0)):
            row[f"{key}_ms"] = median_ms(functools.partial(preprocess, payload, spec, 10**9, mode, headroom), repeats)
        row["floor_ms"] = median_ms(functools.partial(decode_at_one_eighth, payload), repeats)
        for key in ("fast", "fast_h1", "floor"):
            row[f"exact_over_{key}"] = row["exact_ms"] / row[f"{key}_ms"]
        rows.append(row)
    return rows


def print_engine_table(result: dict, args) -> None:
    gemm = result[GEMM_LABEL]
    low, high = gemm["gflops_range"]
    macs = gemm["macs_per_image"]
    print(f"\n{args.model}, batch {args.batch_size}, {args.threads} threads, {args.rounds} interleaved rounds of "
          f"{args.seconds:g} s; {GEMM_LABEL} {GEMM_SIZE}x{GEMM_SIZE}: {gemm['gflops']:.0f} GFLOPS (rounds "
          f"{low:.0f}-{high:.0f})" + (f"; model {macs / 1e9:.2f} GMACs/image" if macs else "; model MACs unknown"))
    print("\n| engine | images/s (median) | x ONNX Runtime fp32 (median of rounds) | per-round x | GFLOPS | "
          "x fp32 GEMM rate |\n|---|---|---|---|---|---|")
    for label, r in result.items():
        if label == GEMM_LABEL:
            continue
        low, high = r["vs_onnxruntime_fp32_range"]
        ceiling = f"{r['gflops']:.0f} | {r['of_fp32_gemm']:.2f}" if "gflops" in r else "- | -"
        print(f"| {label} | {r['images_per_s']:.1f} | {r['vs_onnxruntime_fp32']:.2f} | {low:.2f}-{high:.2f} | "
              f"{ceiling} |")


def load_average() -> str:
    return "/".join(f"{x:.2f}" for x in os.getloadavg())


def get_args_parser() -> argparse.ArgumentParser:
    parser = CliParser(prog="python -m bench cpu", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    add_version_argument(parser)
    parser.add_argument("what", choices=["engines", "decode"])
    parser.add_argument("--repository", type=Path, help="default: export a random-init convnext_tiny (fp32 + int8)")
    parser.add_argument("--model", default="convnext-tiny")
    parser.add_argument("--batch-size", type=positive_int, default=8)
    parser.add_argument("--rounds", type=positive_int, default=5)
    parser.add_argument("--seconds", type=positive_number, default=3.0, help="per configuration per round")
    parser.add_argument("--threads", type=positive_int, default=usable_cpus())
    parser.add_argument("--repeats", type=positive_int, default=7)
    parser.add_argument("--output", type=Path, default=None, help="also write the results as JSON here")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = get_args_parser()
    args = parser.parse_args(argv)

    print(f"{cpu_model()}, {cores_description()}, load average before {load_average()}")
    if args.what == "decode":
        # ConvNeXt-T's evaluation transform (224 crop, crop_pct 0.875 -> resize 256), as the repository writes it.
        spec = Preprocess(resize_px=256, crop_px=224, crop_pct=0.875, interpolation="bicubic",
                          mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
        result = decode_costs(spec, args.repeats)
        print(f"| JPEG | input | KiB | exact ms | fast ms (headroom {FAST_DECODE_HEADROOM:g}, the default) | "
              "exact / fast | fast ms, headroom 1 | exact / that | 1/8-scale decode alone ms (floor) | exact / floor |"
              "\n|---|---|---|---|---|---|---|---|---|---|")
        for r in result:
            print(f"| {r['size']} | {r['input']} | {r['kib']} | {r['exact_ms']:.1f} | {r['fast_ms']:.1f} | "
                  f"{r['exact_over_fast']:.1f} | {r['fast_h1_ms']:.1f} | {r['exact_over_fast_h1']:.1f} | "
                  f"{r['floor_ms']:.1f} | {r['exact_over_floor']:.1f} |")
    else:
        with tempfile.TemporaryDirectory() as tmp:
            repository = args.repository
            if repository is None:
                repository = Path(tmp)
                export_onnx_version(repository, args.model, "convnext_tiny", precisions=("fp32", "int8"))
            version = ModelRepository(repository).load(args.model)
            result = engine_rounds(version, CONFIGS, args.batch_size, args.rounds, args.seconds, args.threads)
        print_engine_table(result, args)
    print(f"\nload average after {load_average()}")
    if args.output:
        write_text_atomic(args.output, json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
