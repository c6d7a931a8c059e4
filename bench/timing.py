"""The timing loop every sweep shares, and points timed in alternating rounds.

Several sessions timed one after another (each point of the GELU variant minutes before the ReLU one's) carry what
the machine did meanwhile into their ratio: a shared VM's neighbours and clock drift ~20% within a session here. In
rounds (A B, B A, A B: the order reversed every other round) each session gets a slice of the point's time budget in
every round, and its figure is all its rounds' images over all their seconds.
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

# Per point, whatever the seconds budget (not above the iterations asked for): fewer make p99 the slowest call.
MIN_TIMED_CALLS = 5
ROUNDS = 3  # rounds per interleaved point


def time_callable(run, batch_size: int, warmup: int, iterations: int, max_seconds: float,
                  min_calls: int = MIN_TIMED_CALLS) -> tuple[float, list[float]]:
    """(images/s, per-call latencies in ms) for `iterations` calls of run(), stopping early at max_seconds once at
    least `min_calls` calls are timed (a slow call cannot leave a point resting on one sample). `iterations` below
    `min_calls` is kept: the caller asked for that few, and the report gives every point's call count (n)."""
    for _ in range(warmup):
        run()
    latencies: list[float] = []
    start = time.perf_counter()
    while len(latencies) < iterations:
        t0 = time.perf_counter()
        run()
        latencies.append((time.perf_counter() - t0) * 1000)
        if len(latencies) >= min_calls and time.perf_counter() - start > max_seconds:
            break
    elapsed = time.perf_counter() - start
    return batch_size * len(latencies) / elapsed, latencies


@dataclass
class RoundsTotal:
    """One session's point over every round: images, seconds, each call's latency (ms), each round's images/s."""

    images: int = 0
    seconds: float = 0.0
    latencies_ms: list[float] = field(default_factory=list)
    round_rates: list[float] = field(default_factory=list)

    @property
    def images_per_s(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else 0.0


def round_order(keys: list[str], round_index: int) -> list[str]:
    """The sessions' order in a round: as given in even rounds, reversed in odd ones (none always goes first)."""
    return keys if round_index % 2 == 0 else keys[::-1]


def time_in_rounds(runs: Mapping[str, Callable[[], object]], batch_size: int, *, warmup: int, iterations: int,
                   max_seconds: float, rounds: int = ROUNDS,
                   on_error: Callable[[str, Exception], None] | None = None) -> dict[str, RoundsTotal]:
    """Each run() (one session's batch of `batch_size`) warmed up in the first round, then timed in `rounds`
    alternating rounds of about iterations / rounds calls and max_seconds / rounds seconds, at least
    ceil(MIN_TIMED_CALLS / rounds) calls each. A run that raises is dropped and reported to on_error(key, error)."""
    live = dict(runs)
    totals = {key: RoundsTotal() for key in live}
    calls, min_calls = max(1, math.ceil(iterations / rounds)), max(1, math.ceil(MIN_TIMED_CALLS / rounds))
    for round_index in range(rounds):
        for key in round_order(list(live), round_index):
            try:
                rate, latencies = time_callable(live[key], batch_size, warmup if round_index == 0 else 0, calls,
                                                max_seconds / rounds, min_calls)
            except Exception as err:  # noqa: BLE001 - one session failing must not end the others' points
                del live[key], totals[key]
                if on_error is not None:
                    on_error(key, err)
                continue
            total = totals[key]
            images = batch_size * len(latencies)
            total.images, total.seconds = total.images + images, total.seconds + images / rate
            total.latencies_ms += latencies
            total.round_rates.append(rate)
    return totals
