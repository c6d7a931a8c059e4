"""closed_loop(steady=True): only requests completing inside the measurement window count, so images/s is the steady
state's (a real asyncio HTTP server that answers each request after a fixed delay)."""
from __future__ import annotations

import asyncio

from bench.loadgen import closed_loop
from tests.bench.canned_http import answering

DELAY_S = 0.05


SERVE_WITH_DELAY = answering(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok", DELAY_S)


async def run(steady: bool) -> dict:
    server = await asyncio.start_server(SERVE_WITH_DELAY, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with server:
        result = await closed_loop(f"http://127.0.0.1:{port}/classify", [b"x" * 100], 4, 10**9, 1.0, steady=steady)
    return result.summary()


def test_steady_counts_the_window_only_and_reports_its_rate():
    steady = asyncio.run(run(steady=True))
    assert steady["elapsed_s"] == 1.0 and not steady["errors"]
    # 4 clients, 50 ms a request: ~80/s in the window (the loop itself adds a little per request).
    assert 55 <= steady["images_per_s"] <= 82
    assert steady["sent"] == steady["ok"] <= 82  # what ran in the 0.25 s before and after is not counted
    whole = asyncio.run(run(steady=False))
    assert whole["elapsed_s"] >= 1.0 and whole["ok"] == whole["sent"] > 0
