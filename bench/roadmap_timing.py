"""A roadmap run's CPU timing: per engine and batch size, every step timed in the same alternating rounds.

Timed one after another, step k ran minutes after step k-1, so the machine's drift meanwhile (a shared VM: ~20%
within a session here) went into their delta. Here an engine holds every step's runner at once and each batch size
is one bench.timing.time_in_rounds sweep over all the steps: every step gets --seconds / rounds in each round, the
order reversed every other round, so a step and the row it modifies are timed in the same minutes. One engine's
runners are built, timed and released before the next engine's are built (17 ONNX Runtime sessions at once are
fine; 17 x 4 engines' would not be).
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .timing import RoundsTotal, time_in_rounds

# An engine: (step's ONNX file, its registry model name, threads) -> run(batch) -> logits.
EngineFactory = Callable[[Path, str, int], Callable[[np.ndarray], object]]
WARMUP_CALLS = 2  # per step, engine and batch size, in the first round only
UNLIMITED_CALLS = 10**6  # the seconds budget ends each round's slice, not a call count


@dataclass(frozen=True)
class ExportedStep:
    """One roadmap row as the CPU engines time it: its key, its registry model (PyTorch eager builds it) and its
    exported, parity-verified fp32 ONNX file."""

    key: str
    model: str
    onnx_path: Path


@dataclass(frozen=True)
class PointTiming:
    """How every (step, engine, batch size) point is timed: `seconds` in all (split over `rounds`), input side in px,
    engine threads."""

    batch_sizes: tuple[int, ...]
    seconds: float
    rounds: int
    input_size: int
    threads: int


def step_failure(key: str, err: Exception) -> str:
    """Why an engine is dropped, in one line: the step it failed on and the error."""
    return f"step {key}: {type(err).__name__}: {' '.join(str(err).split())}"


def time_cpu_engines(steps: Sequence[ExportedStep], factories: Mapping[str, EngineFactory], engines: Sequence[str],
                     timing: PointTiming, failed: dict[str, str]) -> dict[str, dict[str, dict]]:
    """{step key: {engine: {batch: point}}} for every engine that ran every step; one that failed on any step (its
    build or a call) is recorded in `failed` (with the step) and left out."""
    results: dict[str, dict[str, dict]] = {step.key: {} for step in steps}
    for engine in engines:
        # The runners live only inside this call: released before the next engine's are built.
        points = time_engine_in_rounds(engine, steps, factories[engine], timing, failed)
        for key, by_batch in (points or {}).items():
            results[key][engine] = by_batch
    return results


def time_engine_in_rounds(engine: str, steps: Sequence[ExportedStep], factory: EngineFactory, timing: PointTiming,
                          failed: dict[str, str]) -> dict[str, dict[str, dict]] | None:
    """{step key: {batch: point}} for one engine, its steps interleaved in rounds; None when it failed on a step
    (then the rest of that batch size's sweep still runs, and no later batch size is timed)."""
    runners = build_runners(engine, steps, factory, timing.threads, failed)
    if runners is None:
        return None

    def record(key: str, err: Exception) -> None:
        record_failure(engine, step_failure(key, err), failed)

    points: dict[str, dict[str, dict]] = {key: {} for key in runners}
    for batch_size in timing.batch_sizes:
        batch = np.random.default_rng(0).standard_normal(
            (batch_size, 3, timing.input_size, timing.input_size)).astype(np.float32)
        runs = {key: (lambda run=run, batch=batch: run(batch)) for key, run in runners.items()}
        totals = time_in_rounds(runs, batch_size, warmup=WARMUP_CALLS, iterations=UNLIMITED_CALLS,
                                max_seconds=timing.seconds, rounds=timing.rounds, on_error=record)
        if engine in failed:
            return None
        for key, total in totals.items():
            points[key][str(batch_size)] = point_from(total)
        print(f"  {engine} b{batch_size}: " + "  ".join(
            f"{key} {total.images_per_s:.1f}" for key, total in totals.items()), flush=True)
    return points


def build_runners(engine: str, steps: Sequence[ExportedStep], factory: EngineFactory, threads: int,
                  failed: dict[str, str]) -> dict[str, Callable[[np.ndarray], object]] | None:
    """Every step's runner on `engine`, in step order; None (the failure recorded) when one cannot be built."""
    runners = {}
    for step in steps:
        try:
            runners[step.key] = factory(step.onnx_path, step.model, threads)
        except Exception as err:  # noqa: BLE001 - one engine failing (a build, a missing op) must not end the run
            record_failure(engine, step_failure(step.key, err), failed)
            return None
    return runners


def record_failure(engine: str, why: str, failed: dict[str, str]) -> None:
    """Record an engine's first failure (the step it broke on) and say so at once."""
    if engine not in failed:
        failed[engine] = why
        print(f"  {engine} failed: {why}", flush=True)


def point_from(total: RoundsTotal) -> dict:
    """A step's point: images/s over all its rounds, median call latency, timed calls, and each round's images/s
    (their spread is how far the machine moved the point during the sweep)."""
    return {"images_per_s": total.images_per_s, "p50_ms": float(np.percentile(total.latencies_ms, 50)),
            "calls": len(total.latencies_ms), "round_rates": list(total.round_rates)}
