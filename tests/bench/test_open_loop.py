"""bench.open_loop against a real local HTTP server: latency counts from each request's scheduled arrival."""
from __future__ import annotations

import asyncio
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from bench.loadgen import prepared_posts
from bench.open_loop import OpenLoop, even_arrivals_s, open_loop, poisson_arrivals_s

STALL_S = 0.6


@pytest.fixture()
def slow_first_server():
    """A real HTTP/1.1 keep-alive server whose first request stalls STALL_S; every other one answers at once."""
    handled = []

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self):
            self.rfile.read(int(self.headers["Content-Length"]))
            handled.append(time.perf_counter())
            if len(handled) == 1:
                time.sleep(STALL_S)
            self.send_response(200)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"{}")

        def log_message(self, *_):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/classify"
    server.shutdown()
    server.server_close()
    thread.join()


def test_latency_includes_the_wait_behind_a_stalled_request(slow_first_server):
    """One connection, requests due every 100 ms, the first stalls 600 ms: the others wait for the connection.

    Timed from their sends they would look instant (the server answers them at once); timed from their scheduled
    arrivals, as here, each one's latency includes its wait behind the stalled request.
    """
    url = slow_first_server
    load = OpenLoop(url, prepared_posts(url, [b"\xff\xd8jpeg"]), even_arrivals_s(10.0, 0.5), max_connections=1)
    outcomes = {o.index: o for o in asyncio.run(load.run())}
    assert sorted(outcomes) == [0, 1, 2, 3, 4] and {o.status for o in outcomes.values()} == {"200"}
    assert outcomes[0].latency_ms >= STALL_S * 1000
    for index in range(1, 5):
        waited_ms = (STALL_S - outcomes[index].due_s) * 1000  # until the stalled request freed the connection
        assert outcomes[index].latency_ms >= waited_ms - 5, (index, outcomes[index])
        assert outcomes[index].send_lag_ms >= waited_ms - 5  # the generator's lag is visible, not hidden
        server_ms = (outcomes[index].answered_s - outcomes[index].sent_s) * 1000
        assert server_ms < outcomes[index].latency_ms  # what a send-timed generator would have reported


def test_a_stalled_generator_reports_its_send_lag_and_counts_it_in_latency(slow_first_server):
    """The generator's own event loop blocks for 400 ms: requests due meanwhile go out late; the summary says so."""
    url = slow_first_server

    async def run():
        asyncio.get_running_loop().call_later(0.8, time.sleep, 0.4)  # the generator's loop blocks 0.8-1.2 s in
        return await open_loop(url, [b"\xff\xd8jpeg"], rate_per_s=50.0, max_requests=10**6, max_seconds=1.6)

    result = asyncio.run(run())
    summary = result.summary()
    assert result.errors == {} and result.ok == result.sent > 40
    assert summary["send_lag_max_ms"] >= 300
    assert summary["p99_ms"] >= 300  # and the latency percentiles see the stall


def test_arrival_schedules_are_bounded_by_count_and_duration():
    assert even_arrivals_s(4.0, 1.0) == [0.0, 0.25, 0.5, 0.75]
    poisson = poisson_arrivals_s(100.0, 10**6, 2.0, seed=1)
    assert poisson[0] == 0.0 and poisson == sorted(poisson) and poisson[-1] < 2.0
    assert 150 < len(poisson) < 250  # about rate x duration
    assert poisson == poisson_arrivals_s(100.0, 10**6, 2.0, seed=1)  # seeded: the same load every run
    assert len(poisson_arrivals_s(100.0, 7, 2.0)) == 7
