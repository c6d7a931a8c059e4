"""bench/timing.py: points timed in alternating rounds, so that the machine's drift falls on every session alike."""
from __future__ import annotations

import pytest

from bench.timing import MIN_TIMED_CALLS, round_order, time_in_rounds


def test_the_order_is_reversed_every_other_round():
    assert [round_order(["gelu", "relu", "r50"], i) for i in range(3)] == [
        ["gelu", "relu", "r50"], ["r50", "relu", "gelu"], ["gelu", "relu", "r50"]]


def test_every_session_is_timed_in_every_round_and_summed():
    calls: list[str] = []
    runs = {name: (lambda name=name: calls.append(name)) for name in ("gelu", "relu")}
    totals = time_in_rounds(runs, batch_size=4, warmup=1, iterations=6, max_seconds=10.0, rounds=3)
    # Warm-up in the first round only; then each round's calls of one session before the next one's.
    assert calls == ["gelu"] * 3 + ["relu"] * 3 + ["relu"] * 2 + ["gelu"] * 2 + ["gelu"] * 2 + ["relu"] * 2
    for total in totals.values():
        assert len(total.latencies_ms) == 6 and len(total.round_rates) == 3 and total.images == 24
        assert total.images_per_s == pytest.approx(total.images / total.seconds)


def test_a_round_takes_its_share_of_the_minimum_calls_and_a_failing_session_is_dropped_and_reported():
    failures: list[str] = []
    state = {"calls": 0}

    def breaks_in_its_second_round() -> None:
        state["calls"] += 1
        if state["calls"] > 2:
            raise RuntimeError("provider failed")

    runs = {"ok": lambda: None, "broken": breaks_in_its_second_round}
    totals = time_in_rounds(runs, batch_size=1, warmup=0, iterations=30, max_seconds=0.0, rounds=3,
                            on_error=lambda key, err: failures.append(f"{key}: {err}"))
    assert failures == ["broken: provider failed"] and list(totals) == ["ok"]
    # Out of time at once, each round still times ceil(5 / 3) = 2 calls: no point rests on one sample per round.
    assert len(totals["ok"].latencies_ms) == 3 * -(-MIN_TIMED_CALLS // 3)
