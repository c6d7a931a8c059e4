"""closed_loop(steady=True): only requests completing inside the measurement window count, so images/s is the steady
state's, fitted to their completion times so that batches answered together do not quantise it (a real asyncio HTTP
server that answers each request after a fixed delay, or every request waiting at each tick of a clock)."""
from __future__ import annotations

import asyncio
from collections import Counter

import pytest

from bench.loadgen import closed_loop, jpeg_payloads, steady_rate
from tests.bench.canned_http import answering

DELAY_S = 0.05
OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
SERVE_WITH_DELAY = answering(OK, DELAY_S)


async def run(steady: bool) -> dict:
    server = await asyncio.start_server(SERVE_WITH_DELAY, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with server:
        result = await closed_loop(f"http://127.0.0.1:{port}/classify", [b"x" * 100], 4, 10**9, 1.0, steady=steady)
    return result.summary()


def test_steady_counts_the_window_only_and_reports_its_rate():
    steady = asyncio.run(run(steady=True))
    assert steady["elapsed_s"] == 1.0 and not steady["errors"]
    # 4 clients, 50 ms a request: ~80/s in the window (the loop itself adds a little per request, and a busy machine
    # more: the lower bound only says the rate was measured). The upper bound is the point: 1.5 s of requests counted
    # would be ~120/s.
    assert 40 <= steady["images_per_s"] <= 82
    assert steady["sent"] == steady["ok"] <= 82  # what ran in the 0.25 s before and after is not counted
    whole = asyncio.run(run(steady=False))
    assert whole["elapsed_s"] >= 1.0 and whole["ok"] == whole["sent"] > 0


async def run_batched(batch: int, period_s: float, window_s: float) -> dict:
    """`batch` clients against a server that answers whatever waits every period_s: batches complete together."""
    server = await asyncio.start_server(answering(OK, period_s=period_s), "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with server:
        result = await closed_loop(f"http://127.0.0.1:{port}/classify", [b"x" * 100], batch, 10**9, window_s,
                                   steady=True)
    return result.summary()


def test_steady_rate_of_batched_answers_is_not_quantised_by_the_batch():
    # 8 answers every 0.5 s is 16/s; the 1.2 s window holds two batches, whose count / window would say 13.3/s. The
    # clock ticks 0.05 s before the window opens and 0.25 s after it closes, so late answers or a late start (a busy
    # machine) can bring a third batch in: 20/s by count, still 16/s by slope. rel=0.1 leaves room for a batch
    # answered ~50 ms late and still tells 16/s from both 13.3/s and 20/s.
    steady = asyncio.run(run_batched(batch=8, period_s=0.5, window_s=1.2))
    assert steady["ok"] in (16, 24) and not steady["errors"]
    assert steady["images_per_s"] == pytest.approx(16.0, rel=0.1)


async def sizes_sent(concurrency: int, requests: int) -> Counter:
    """The JPEG sizes a batching server received from a closed loop of the mixed upload sizes (500x375 and 1024x768,
    alternating in jpeg_payloads()), by their width x height."""
    payloads = jpeg_payloads()
    size_of = {payload: f"{w}x{h}" for payload, (w, h) in zip(payloads, [(500, 375), (1024, 768)] * 6, strict=True)}
    received: list[bytes] = []
    server = await asyncio.start_server(answering(OK, period_s=0.02, received=received), "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with server:
        await closed_loop(f"http://127.0.0.1:{port}/classify", payloads, concurrency, requests, 60.0)
    return Counter(size_of[body] for body in received)


@pytest.mark.parametrize("concurrency", [1, 3, 8, 32])
def test_the_closed_loop_sends_the_upload_sizes_in_equal_shares_whichever_client_is_free(concurrency):
    # The payload was picked by the client's index as well as the count sent: with batches answered together, the
    # order in which clients resumed skewed the 50/50 mix (277:166 at 8 clients against a batching server).
    sent = asyncio.run(sizes_sent(concurrency, 96))
    assert sum(sent.values()) == 96 and abs(sent["500x375"] - sent["1024x768"]) <= 1


def test_steady_rate_is_the_slope_of_the_running_count():
    batches = [tick + i * 1e-4 for tick in (0.5, 1.0, 1.5) for i in range(8)]  # 8 answers, within a millisecond
    assert steady_rate(batches, window_s=1.2) == pytest.approx(16.0, rel=0.01)
    assert steady_rate([0.1 * i for i in range(11)], window_s=1.0) == pytest.approx(10.0)
    assert steady_rate([0.5] * 8, window_s=1.2) == pytest.approx(8 / 1.2)  # one batch: nothing to fit, the count
    assert steady_rate([], window_s=1.0) == 0.0
