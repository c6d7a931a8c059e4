"""What preprocessing costs per image (decode, resize, crop, normalize) next to what inference costs.

Timed on the load generator's real JPEG payloads with the service's own functions (runtime.preprocess: exact
decode, its resize, crop and normalized_tensor), one thread, median of `repeats`; the engine's per-image CPU cost
(wall time per image x its threads, a CPU engine's only) comes from the engine sweep of the same run, so the share is
of the CPU time one image costs end to end (HTTP aside).
"""
from __future__ import annotations

import time
from statistics import median

import numpy as np

from runtime.preprocess import center_crop, decode_image, normalized_tensor, resize_short_side, resize_squash

STAGES = ("decode", "resize", "crop", "normalize")


def median_ms(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append((time.perf_counter() - started) * 1000)
    return median(times)


def stage_costs(payload: bytes, spec, repeats: int = 7, max_pixels: int = 100_000_000) -> dict[str, float]:
    """Milliseconds per stage for one encoded image, in the order the service runs them (its exact decode mode:
    runtime.preprocess.eval_transform's stages)."""
    resize = resize_squash if spec.crop_mode == "squash" else resize_short_side
    picture = decode_image(payload, max_pixels)
    resized = resize(picture, spec.resize_px, spec.interpolation)
    cropped = center_crop(resized, spec.crop_px)
    return {
        "width": picture.size[0], "height": picture.size[1], "bytes": len(payload),
        "decode": median_ms(lambda: decode_image(payload, max_pixels), repeats),
        "resize": median_ms(lambda: resize(picture, spec.resize_px, spec.interpolation), repeats),
        "crop": median_ms(lambda: center_crop(resized, spec.crop_px), repeats),
        "normalize": median_ms(lambda: normalized_tensor(cropped, spec), repeats),
    }


def preprocess_report(payloads: list[bytes], spec, engine_cpu_ms_per_image: float | None, repeats: int = 7) -> dict:
    """Per-size rows (mean over the payloads of that size) and the share of preprocessing in an image's CPU cost."""
    by_size: dict[tuple[int, int], list[dict]] = {}
    for payload in payloads:
        costs = stage_costs(payload, spec, repeats)
        by_size.setdefault((costs["width"], costs["height"]), []).append(costs)
    rows = []
    for (width, height), costs in sorted(by_size.items()):
        row = {"size": f"{width}x{height}", "images": len(costs),
               "kib": round(float(np.mean([c["bytes"] for c in costs])) / 1024, 1)}
        row |= {stage: float(np.mean([c[stage] for c in costs])) for stage in STAGES}
        row["total"] = sum(row[stage] for stage in STAGES)
        rows.append(row)
    mean_total = float(np.mean([r["total"] for r in rows])) if rows else 0.0
    return {"rows": rows, "mean_ms_per_image": mean_total, "engine_cpu_ms_per_image": engine_cpu_ms_per_image,
            "share_of_cpu": (mean_total / (mean_total + engine_cpu_ms_per_image)) if engine_cpu_ms_per_image else None}
