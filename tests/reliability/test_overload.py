"""Open-loop overload at 4x the sustainable rate against `python -m service`: fast 503s, no hangs, throughput kept."""
from __future__ import annotations

import asyncio
import json
import time

import numpy as np
import pytest

from bench.http_client import Connection, HttpError, prepare_post
from bench.loadgen import jpeg_payloads
from bench.server_process import service
from bench.soak import export_atto, rss_mb, service_args

QUEUE_SIZE, MAX_BATCH_SIZE, OVERLOAD_FACTOR = 16, 8, 4.0
SHED_CODES = {"queue_full", "too_many_connections"}  # the batch queue, or the server's connection limit


@pytest.fixture(scope="module")
def engine_bound_repository(tmp_path_factory):
    """convnext_atto at 224 px: inference, not HTTP parsing, is the bottleneck, as with any real model.

    At 64 px the engine is so cheap that 4x its rate overloads the single-threaded HTTP layer itself on 2 cores,
    which no queue can shed.
    """
    return export_atto(tmp_path_factory.mktemp("models"), input_size_px=224)


class AnsweringConnection(Connection):
    """The benchmark's lean client (its CPU stays off the server's cores), also returning the response headers."""

    async def exchange(self, request) -> tuple[int, dict[str, str], bytes]:
        if self.writer is None or self.writer.is_closing():
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        self.writer.write(request.data)
        status, headers = await self._read_head()
        body = await self._read_body(headers)
        if headers.get("connection", "").lower() == "close":
            await self.close()
        return status, headers, body


async def _one(request, answers: list, connection: AnsweringConnection) -> None:
    """POST once; append (status or transport error name, latency ms, headers, body) to `answers`."""
    started = time.perf_counter()
    try:
        status, headers, body = await asyncio.wait_for(connection.exchange(request), 30)
    except (TimeoutError, HttpError, OSError, ValueError, asyncio.IncompleteReadError) as err:
        status, headers, body = type(err).__name__, {}, b""
        await connection.close()
    answers.append((status, (time.perf_counter() - started) * 1000, headers, body))


async def _closed_loop(url: str, requests: list, clients: int, seconds: float) -> tuple[list, float]:
    answers: list = []
    deadline = time.perf_counter() + seconds

    async def client(index: int) -> None:
        connection = AnsweringConnection.for_url(url)
        while time.perf_counter() < deadline:
            await _one(requests[(len(answers) + index) % len(requests)], answers, connection)
        await connection.close()

    started = time.perf_counter()
    await asyncio.gather(*(client(i) for i in range(clients)))
    return answers, time.perf_counter() - started


async def _open_loop(url: str, requests: list, rate_per_s: float, seconds: float) -> tuple[list, int, float]:
    """Evenly spaced arrivals, whether or not earlier ones answered; keep-alive connections reused when free."""
    answers: list = []
    tasks, idle = [], []

    async def arrival(request) -> None:
        connection = idle.pop() if idle else AnsweringConnection.for_url(url)
        await _one(request, answers, connection)
        idle.append(connection)  # reopened on next use if the server closed it

    started = time.perf_counter()
    for index in range(int(rate_per_s * seconds)):
        await asyncio.sleep(max(0.0, started + index / rate_per_s - time.perf_counter()))
        tasks.append(asyncio.create_task(arrival(requests[index % len(requests)])))
    await asyncio.gather(*tasks)
    elapsed_s = time.perf_counter() - started
    for connection in idle:
        await connection.close()
    return answers, len(tasks), elapsed_s


def _sustainable_rate(url: str, requests: list) -> float:
    """Requests per second a closed loop of 8 clients gets answered in 3 s, none of them shed."""
    calibration, calibration_s = asyncio.run(_closed_loop(url, requests, clients=8, seconds=3.0))
    assert {a[0] for a in calibration} == {200}, "the closed loop at 8 clients must not be shed"
    return len(calibration) / calibration_s


@pytest.mark.timeout(120)
def test_overload_sheds_with_fast_503s_and_keeps_serving(engine_bound_repository):
    with service(service_args(engine_bound_repository, QUEUE_SIZE, MAX_BATCH_SIZE)) as server:
        url = server.url
        requests = [prepare_post(f"{url}/classify", body) for body in jpeg_payloads(sizes=((500, 375),))]
        sustainable_before = _sustainable_rate(url, requests)
        rss_before = rss_mb(server.pid)

        answers, sent, elapsed_s = asyncio.run(_open_loop(url, requests, OVERLOAD_FACTOR * sustainable_before, 4.0))
        rss_growth = rss_mb(server.pid) - rss_before
        # The 2 cores are shared with whatever else runs: measured again after the overload, the lower of the two is
        # what the machine sustained while it lasted (load that began mid-test lowers throughput, not the service).
        sustainable = min(sustainable_before, _sustainable_rate(url, requests))

    statuses = [a[0] for a in answers]
    transport_errors = [s for s in statuses if not isinstance(s, int)]
    assert len(answers) == sent and not transport_errors, f"{len(transport_errors)} requests got no answer"
    assert set(statuses) <= {200, 503}, sorted(set(statuses))
    shed = [a for a in answers if a[0] == 503]
    accepted = [a for a in answers if a[0] == 200]
    assert shed and accepted, f"{len(shed)} shed, {len(accepted)} accepted of {sent}"
    for _, _, headers, body in shed:
        assert headers.get("retry-after") == "1"
        assert json.loads(body)["error"]["code"] in SHED_CODES
    shed_p50, accepted_p50 = (float(np.median([a[1] for a in group])) for group in (shed, accepted))
    codes = sorted({json.loads(a[3])["error"]["code"] for a in shed})
    assert shed_p50 < accepted_p50 / 3, f"503 ({codes}) p50 {shed_p50:.1f} ms vs 200 p50 {accepted_p50:.1f} ms"
    accepted_per_s = len(accepted) / elapsed_s
    # Half: a service that collapses under overload keeps far less. The rest is room for CPU steal during the 4 s
    # of overload that the calibrations on either side of it did not see.
    assert accepted_per_s >= 0.5 * sustainable, f"{accepted_per_s:.0f} accepted/s vs {sustainable:.0f} sustainable"
    assert rss_growth < 200, f"server RSS grew {rss_growth:.0f} MB under overload"
