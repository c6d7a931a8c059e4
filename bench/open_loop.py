"""The one open-loop load generator: request i is due at t0 + its arrival offset, and its latency counts from then.

Timing from the due time rather than from the send avoids coordinated omission: when the generator falls behind
(its event loop busy, or every connection held by a stalled request) the wait shows in the latency instead of
vanishing from it, and each request's send lag (sent - due) says how far behind the generator was.
"""
from __future__ import annotations

import asyncio
import random
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

from bench.http_client import Connection, HttpError, PreparedRequest
from bench.loadgen import LoadResult, check_loopback, http_error_text, prepared_posts, transport_error_text

# uvicorn closes a keep-alive connection idle for 5 s; reusing one it is closing would count as a server error.
KEEP_ALIVE_REUSE_S = 2.0
# Enough for any load the service admits (its queue sheds beyond a few hundred); past it, requests wait for a free
# connection, and that wait is part of their latency.
MAX_CONNECTIONS = 256


def even_arrivals_s(rate_per_s: float, seconds: float) -> list[float]:
    """Evenly spaced due times for `seconds`: request i at i / rate_per_s."""
    return [index / rate_per_s for index in range(int(seconds * rate_per_s))]


def poisson_arrivals_s(rate_per_s: float, max_requests: int, max_seconds: float, seed: int = 0) -> list[float]:
    """Poisson due times (the first at 0, then exponential gaps): at most `max_requests`, all before `max_seconds`."""
    rng, arrivals, next_s = random.Random(seed), [], 0.0
    while len(arrivals) < max_requests and next_s < max_seconds:
        arrivals.append(next_s)
        next_s += rng.expovariate(rate_per_s)
    return arrivals


@dataclass(frozen=True)
class Outcome:
    """One open-loop request: when it was due, sent and answered (seconds after t0), and its status."""

    index: int
    due_s: float
    sent_s: float
    answered_s: float
    status: str  # the HTTP status ("200", "503"), or the transport error's name ("TimeoutError")
    error: str | None = None  # a failure as one line (bench.loadgen.http_error_text / transport_error_text)

    @property
    def latency_ms(self) -> float:
        return (self.answered_s - self.due_s) * 1000

    @property
    def send_lag_ms(self) -> float:
        return (self.sent_s - self.due_s) * 1000


class OpenLoop:
    """Sends request i when it is due, whether or not earlier ones have answered, on reused keep-alive connections.

    `outcomes` grows as requests are answered and `dispatched` counts the requests already due, so a sampler running
    beside `run` (bench.soak) can read both while the load goes on.
    """

    def __init__(self, url: str, requests: Sequence[PreparedRequest], arrivals_s: Sequence[float],
                 timeout_s: float = 60.0, max_connections: int = MAX_CONNECTIONS):
        check_loopback(url)
        if not requests:
            raise ValueError("an open loop needs at least one request to send")
        self.url, self.requests, self.arrivals_s, self.timeout_s = url, requests, arrivals_s, timeout_s
        self.outcomes: list[Outcome] = []
        self.dispatched = 0
        self._max_connections = max_connections
        self._idle: list[tuple[float, Connection]] = []  # (idle since, connection), most recently used last

    async def run(self, t0: float | None = None) -> list[Outcome]:
        """Send every request at t0 (time.perf_counter; default now) + its due time; all outcomes once answered."""
        t0 = time.perf_counter() if t0 is None else t0
        slots = asyncio.Semaphore(self._max_connections)
        tasks = []
        try:
            for index, due_s in enumerate(self.arrivals_s):
                await asyncio.sleep(max(0.0, t0 + due_s - time.perf_counter()))
                tasks.append(asyncio.create_task(self._one(index, t0, due_s, slots)))
                self.dispatched += 1
            await asyncio.gather(*tasks)
        finally:
            for _, connection in self._idle:
                await connection.close()
            self._idle.clear()
        return self.outcomes

    async def _one(self, index: int, t0: float, due_s: float, slots: asyncio.Semaphore) -> None:
        async with slots:
            connection = await self._connection()
            sent_s = time.perf_counter() - t0
            try:
                code, body = await asyncio.wait_for(connection.send(self.requests[index % len(self.requests)]),
                                                    self.timeout_s)
                status, error = str(code), None if code == 200 else http_error_text(code, body)
            except (TimeoutError, HttpError, OSError) as err:  # counted, not fatal, during a load run
                await connection.close()
                status, error = type(err).__name__, transport_error_text(err)
            answered = time.perf_counter()
            self.outcomes.append(Outcome(index, due_s, sent_s, answered - t0, status, error))
            self._idle.append((answered, connection))

    async def _connection(self) -> Connection:
        """The most recently used idle connection, unless the server may be closing it; else a new one."""
        while self._idle:
            idle_since, connection = self._idle.pop()
            if time.perf_counter() - idle_since < KEEP_ALIVE_REUSE_S:
                return connection
            await connection.close()
        return Connection.for_url(self.url)


def load_result(url: str, rate_per_s: float, outcomes: Sequence[Outcome], elapsed_s: float) -> LoadResult:
    """The open loop's outcomes as a LoadResult: latency from its due time of each 200 and, apart, of each failure;
    errors by status."""
    errors = Counter(o.status for o in outcomes if o.status != "200")
    ok = [o for o in outcomes if o.status == "200"]
    return LoadResult("open", url, None, rate_per_s, sent=len(outcomes), ok=len(ok), errors=dict(errors),
                      elapsed_s=elapsed_s, latencies_ms=[o.latency_ms for o in ok],
                      failed_latencies_ms=[o.latency_ms for o in outcomes if o.status != "200"],
                      send_lags_ms=[o.send_lag_ms for o in outcomes],
                      first_error=next((o.error for o in outcomes if o.status != "200"), None))


async def open_loop(url: str, payloads: list[bytes], rate_per_s: float, max_requests: int, max_seconds: float,
                    timeout_s: float = 60.0, seed: int = 0, form_field: str | None = None,
                    api_key: str | None = None) -> LoadResult:
    """Requests arrive as a Poisson process at `rate_per_s`, whether or not earlier ones have answered."""
    check_loopback(url)
    if rate_per_s <= 0:
        raise ValueError(f"rate_per_s must be > 0, got {rate_per_s}")
    loop = OpenLoop(url, prepared_posts(url, payloads, form_field, api_key),
                    poisson_arrivals_s(rate_per_s, max_requests, max_seconds, seed), timeout_s)
    started = time.perf_counter()
    outcomes = await loop.run(started)
    return load_result(url, rate_per_s, outcomes, time.perf_counter() - started)
