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


ANSWER_503 = answering(b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
                       b"Content-Length: %d\r\n\r\n%s" % (len(BUSY_BODY), BUSY_BODY))


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
