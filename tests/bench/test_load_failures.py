"""A load run whose requests fail says so: JSON-valid summaries (null latencies, never NaN) naming the first error,
against real sockets (a port where nothing listens, an asyncio server answering 503)."""
from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import Iterator

import pytest

from bench.loadgen import closed_loop
from bench.open_loop import open_loop
from tests.bench.canned_http import answering

BUSY_BODY = b'{"error": {"code": "overloaded", "message": "the queue is full"}}'


def strict_json(summary: dict) -> dict:
    """The summary through JSON as a strict parser reads it: NaN or Infinity fail."""
    return json.loads(json.dumps(summary, allow_nan=False))


@pytest.fixture()
def dead_url() -> Iterator[str]:
    with socket.socket() as s:  # bound, never listening: connections are refused
        s.bind(("127.0.0.1", 0))
        yield f"http://127.0.0.1:{s.getsockname()[1]}/classify"


RESPONSE_503 = (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
                b"Content-Length: %d\r\n\r\n%s" % (len(BUSY_BODY), BUSY_BODY))
ANSWER_503 = answering(RESPONSE_503)


async def closed_loop_against_503() -> dict:
    server = await asyncio.start_server(ANSWER_503, "127.0.0.1", 0)
    async with server:
        url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/classify"
        return (await closed_loop(url, [b"x" * 100], 2, 6, 5.0)).summary()


def test_a_closed_loop_where_nothing_listens_has_null_latencies_and_names_the_first_error(dead_url):
    summary = strict_json(asyncio.run(closed_loop(dead_url, [b"x" * 100], 2, 4, 5.0)).summary())
    assert summary["sent"] == 4 and summary["ok"] == 0 and summary["errors"] == {"ConnectionRefusedError": 4}
    assert summary["p50_ms"] is None and summary["p95_ms"] is None and summary["p99_ms"] is None
    assert summary["first_error"].startswith("ConnectionRefusedError: ")


def test_an_open_loop_where_nothing_listens_has_null_latencies_and_names_the_first_error(dead_url):
    summary = strict_json(asyncio.run(open_loop(dead_url, [b"x" * 100], 50.0, 3, 5.0)).summary())
    assert summary["ok"] == 0 and summary["sent"] == sum(summary["errors"].values()) > 0
    assert summary["p50_ms"] is None and summary["p99_ms"] is None
    assert summary["first_error"].startswith("ConnectionRefusedError: ")


def test_an_http_error_is_named_with_its_status_and_the_start_of_its_body():
    summary = strict_json(asyncio.run(closed_loop_against_503()))
    assert summary["errors"] == {"503": 6} and summary["p50_ms"] is None
    assert summary["first_error"] == f"HTTP 503: {BUSY_BODY.decode()}"


SLOW_REFUSAL_S = 0.3
ANSWER_200 = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}"


async def fast_200_or_slow_503(body: bytes) -> bytes:
    """A 200 at once to a body of b"ok"; a 503 after SLOW_REFUSAL_S to any other."""
    if body == b"ok":
        return ANSWER_200
    await asyncio.sleep(SLOW_REFUSAL_S)
    return RESPONSE_503


async def mixed_load(loop_kind: str) -> dict:
    server = await asyncio.start_server(answering(b"", respond=fast_200_or_slow_503), "127.0.0.1", 0)
    async with server:
        url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/classify"
        if loop_kind == "closed":
            return (await closed_loop(url, [b"ok", b"slow"], 2, 8, 10.0)).summary()
        return (await open_loop(url, [b"ok", b"slow"], 40.0, 8, 10.0)).summary()


@pytest.mark.parametrize("loop_kind", ["closed", "open"])
def test_slow_refusals_have_their_own_latency_and_stay_out_of_the_successes_percentiles(loop_kind):
    summary = strict_json(asyncio.run(mixed_load(loop_kind)))
    assert summary["ok"] == 4 and summary["errors"] == {"503": 4}
    assert summary["p99_ms"] < SLOW_REFUSAL_S * 1000 / 2  # the 200s' alone: answered at once
    assert summary["failed_p50_ms"] >= SLOW_REFUSAL_S * 1000 * 0.9
    assert summary["failed_max_ms"] >= summary["failed_p50_ms"]


def test_failed_latency_is_null_without_failures_and_the_only_latency_when_all_failed():
    async def closed_loop_against_200() -> dict:
        server = await asyncio.start_server(answering(ANSWER_200), "127.0.0.1", 0)
        async with server:
            url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/classify"
            return (await closed_loop(url, [b"ok"], 2, 4, 5.0)).summary()

    all_ok = strict_json(asyncio.run(closed_loop_against_200()))
    assert all_ok["ok"] == 4 and all_ok["failed_p50_ms"] is None and all_ok["failed_max_ms"] is None
    all_failed = strict_json(asyncio.run(closed_loop_against_503()))
    assert all_failed["p50_ms"] is None and all_failed["failed_p50_ms"] is not None
