"""Engine "auto": on the CPU, measure the engines that keep fp32 accuracy on the served model and serve the faster.

The rule: every candidate (ONNX Runtime fp32, OpenVINO fp32 where it imports) is loaded and warmed up, then runs
batches of max_batch_size for the same fixed time, in alternating rounds so a neighbour's load hits each alike, with
as many batches in flight as the batcher would keep (Engine.max_concurrent_batches); the most images/s wins (one that
fails while measured is left out, like one that does not load). bf16 and int8 change the logits, so they are never
candidates: they stay opt-in (--engine openvino --precision bf16).
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

import numpy as np

from runtime.engines.base import Engine, EngineDescription, EngineError

logger = logging.getLogger("convnext.runtime")
MEASURE_ROUNDS = 2  # each candidate's time is split into this many alternating rounds


MIN_BATCHES_PER_THREAD = 2  # so that a window with every thread busy exists (measure_images_per_s)


def measure_images_per_s(engine: Engine, batch: np.ndarray, seconds: float, in_flight: int | None = None) -> float:
    """Images/s of engine.run(batch) for about `seconds`, `in_flight` calls at once, each from its own thread
    (default: max_concurrent_batches, what the batcher keeps); every thread runs at least MIN_BATCHES_PER_THREAD.

    Counted while every thread is busy (busy_window_images_per_s): the whole run's batches over the whole time would
    count the tail, where some threads have stopped, as idle time (undercounting several in flight against one),
    and summing each thread's own rate would overcount calls that queue inside the engine (a thread's own time
    leaves out the others' turns: n queued threads would add up to 1 + 1/2 + ... + 1/n times the true rate).
    """
    deadline = time.perf_counter() + seconds

    def run_until_deadline() -> list[float]:
        ends: list[float] = []
        while len(ends) < MIN_BATCHES_PER_THREAD or time.perf_counter() < deadline:
            engine.run(batch)
            ends.append(time.perf_counter())
        return ends

    started = time.perf_counter()
    in_flight = in_flight or engine.max_concurrent_batches
    if in_flight == 1:
        return busy_window_images_per_s([run_until_deadline()], len(batch), started)
    with ThreadPoolExecutor(in_flight, thread_name_prefix="auto-measure") as pool:
        per_thread = list(pool.map(lambda _: run_until_deadline(), range(in_flight)))
    return busy_window_images_per_s(per_thread, len(batch), started)


def busy_window_images_per_s(per_thread: list[list[float]], batch_size: int, started: float) -> float:
    """Images/s from each thread's batch end times: the batches that ended after every thread had ended its first
    (all busy from then on) and by the time the first thread ended its last (fewer busy after), over that window;
    one thread: its batches after the first, over first to last. Where no batch ended inside the window (a thread
    finished before another's first batch), all batches over the whole run."""
    all_busy = max(ends[0] for ends in per_thread)
    first_stop = min(ends[-1] for ends in per_thread)
    inside = sum(all_busy < end <= first_stop for ends in per_thread for end in ends)
    if inside and first_stop > all_busy:
        return inside * batch_size / (first_stop - all_busy)
    return sum(len(ends) for ends in per_thread) * batch_size / (max(ends[-1] for ends in per_thread) - started)


class AutoEngine(Engine):
    """load() builds, loads and measures every candidate and keeps the fastest (the others are closed); from then
    on it runs as the engine it chose, and describes itself as that engine plus every candidate's images/s."""

    def __init__(self, candidates: dict[str, Callable[[], Engine]], measure_s: float):
        if not candidates:
            raise EngineError("engine auto needs at least one candidate engine")
        self.candidates = candidates  # name -> a function that builds that engine (not loaded)
        self.measure_s = measure_s  # per candidate, all rounds together
        self.chosen: Engine | None = None
        self.chosen_name: str | None = None
        self.images_per_s: dict[str, float] = {}
        self.described: EngineDescription | None = None  # the chosen engine's description, kept after close()

    @property  # read-only here: the chosen engine's figure, never assigned
    def max_concurrent_batches(self) -> int:  # type: ignore[override]
        return self.chosen.max_concurrent_batches if self.chosen is not None else 1

    def load(self) -> None:
        if self.chosen is not None:
            return
        engines = self._load_candidates()
        try:
            spec = next(iter(engines.values())).describe()
            batch = np.random.default_rng(0).standard_normal((spec.max_batch_size, *spec.input_shape),
                                                             dtype=np.float32)
            rates: dict[str, list[float]] = {name: [] for name in engines}
            for round_index in range(MEASURE_ROUNDS):
                names = list(engines) if round_index % 2 == 0 else list(reversed(engines))  # none always goes first
                for name in names:
                    # One that fails is left out like one that does not load: any Exception, as ONNX Runtime's
                    # errors (InvalidArgument, RuntimeException, ...) derive from Exception, not RuntimeError.
                    try:
                        rates[name].append(measure_images_per_s(engines[name], batch, self.measure_s / MEASURE_ROUNDS))
                    except Exception as err:
                        logger.warning("engine auto: leaving out %s, it failed while measured (%s: %s)", name,
                                       type(err).__name__, err)
                        engines.pop(name).close()
                        del rates[name]
                if not engines:
                    raise EngineError("engine auto: every candidate failed while measured (see the warnings above)")
        except BaseException:
            for engine in engines.values():
                engine.close()
            raise
        self.images_per_s = {name: round(sum(r) / len(r), 2) for name, r in rates.items()}
        self.chosen_name = max(self.images_per_s, key=self.images_per_s.__getitem__)
        for name, engine in engines.items():
            if name != self.chosen_name:
                engine.close()
        self.chosen = engines[self.chosen_name]
        self.described = replace(self.chosen.describe(), auto_images_per_s=dict(self.images_per_s))
        figures = ", ".join(f"{name} {rate:.1f}" for name, rate in self.images_per_s.items())
        logger.info("engine auto chose %s: images/s at batch %d over %.1f s each: %s", self.chosen_name,
                    spec.max_batch_size, self.measure_s, figures)

    def _load_candidates(self) -> dict[str, Engine]:
        """Each candidate loaded and warmed up; one that cannot load is left out (and logged), unless all fail."""
        engines, errors = {}, {}
        for name, build in self.candidates.items():
            engine = None
            try:
                engine = build()
                engine.load()
                engine.warmup(1)
            except Exception as err:  # OpenVINO not installed, the model refused, an ONNX Runtime error, ...
                if engine is not None:
                    engine.close()
                errors[name] = f"{type(err).__name__}: {err}"
                logger.warning("engine auto: leaving out %s, it did not load (%s)", name, errors[name])
                continue
            engines[name] = engine
        if not engines:
            raise EngineError(f"engine auto: no candidate engine loaded ({errors})")
        return engines

    def warmup(self, runs: int = 2) -> None:
        self._loaded().warmup(runs)

    def run(self, batch: np.ndarray) -> np.ndarray:
        return self._loaded().run(batch)

    def describe(self) -> EngineDescription:
        """The chosen engine's description; after close() the last one (a closed engine is still described while the
        service rebuilds it: /models, model metadata)."""
        if self.chosen is None and self.described is not None:
            return self.described
        return replace(self._loaded().describe(), auto_images_per_s=dict(self.images_per_s))

    def close(self) -> None:
        if self.chosen is not None:
            self.chosen.close()
        self.chosen = None  # a later load() measures again instead of returning a closed engine

    def _loaded(self) -> Engine:
        if self.chosen is None:
            raise EngineError("the engine is not loaded; call load() first")
        return self.chosen
