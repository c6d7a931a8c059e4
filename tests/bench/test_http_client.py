"""The load generator's lean HTTP client against a real asyncio server: keep-alive, chunked bodies, closes."""
from __future__ import annotations

import asyncio
import socket
import time
from contextlib import asynccontextmanager

import pytest

from bench.http_client import BlockingConnection, Connection, HttpError, prepare_get, prepare_post
from bench.lone_request import lone_requests


@asynccontextmanager
async def _serving(handler):
    """An asyncio server on 127.0.0.1 answering with `handler`; yields its port, closes it on the way out."""
    server = await asyncio.start_server(handler, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        await server.wait_closed()


async def _read_request(reader) -> bytes:
    head = await reader.readuntil(b"\r\n\r\n")
    lengths = [line.split(b":")[1] for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")]
    return head + await reader.readexactly(int(lengths[0]) if lengths else 0)


def test_keep_alive_chunked_and_server_closed_connections():
    seen: list[bytes] = []
    connections = 0

    async def handler(reader, writer):
        nonlocal connections
        connections += 1
        while True:
            try:
                seen.append(await _read_request(reader))
            except asyncio.IncompleteReadError:
                break
            n = len(seen)
            if n == 1:
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            elif n == 2:
                writer.write(b"HTTP/1.1 503 Service Unavailable\r\nTransfer-Encoding: chunked\r\n\r\n"
                             b"3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n")
            else:
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nConnection: close\r\n\r\nbye")
                await writer.drain()
                writer.close()
                break
            await writer.drain()

    async def main():
        async with _serving(handler) as port:
            url = f"http://127.0.0.1:{port}/classify"
            connection = Connection.for_url(url)
            raw = prepare_post(url, b"\xff\xd8jpeg")
            assert await connection.send(raw) == (200, b"ok")
            assert await connection.send(prepare_post(url, b"x", form_field="content")) == (503, b"abcde")
            assert await connection.send(raw) == (200, b"bye")
            assert await connection.send(raw) == (200, b"bye")  # on a new connection: the server closed the first
            await connection.close()

    asyncio.run(main())
    assert connections == 2
    assert seen[0].startswith(b"POST /classify HTTP/1.1\r\n") and seen[0].endswith(b"\xff\xd8jpeg")
    assert b"multipart/form-data; boundary=" in seen[1] and b'name="content"; filename="image.jpg"' in seen[1]


def test_a_garbled_response_is_an_http_error():
    async def handler(reader, writer):
        await _read_request(reader)
        writer.write(b"SMTP ready\r\n\r\n")
        await writer.drain()
        writer.close()

    async def main():
        async with _serving(handler) as port:
            connection = Connection.for_url(f"http://127.0.0.1:{port}/")
            with pytest.raises(HttpError, match="not an HTTP/1.x status line"):
                await connection.send(prepare_post(f"http://127.0.0.1:{port}/", b"x"))

    asyncio.run(main())


def test_a_keep_alive_connection_the_server_closed_is_replaced_not_an_error():
    async def handler(reader, writer):
        await _read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()
        writer.close()  # an idle timeout: the server drops the kept-alive connection without saying so

    async def main():
        async with _serving(handler) as port:
            url = f"http://127.0.0.1:{port}/"
            connection = Connection.for_url(url)
            request = prepare_post(url, b"x")
            assert await connection.send(request) == (200, b"ok")
            await asyncio.sleep(0.05)  # the server's FIN arrives
            assert await connection.send(request) == (200, b"ok")
            assert await connection.send(request) == (200, b"ok")  # and again, whether or not the FIN was seen yet
            await connection.close()

    asyncio.run(main())


def test_a_get_without_a_body_reads_the_whole_answer():
    seen: list[bytes] = []

    async def handler(reader, writer):
        seen.append(await _read_request(reader))
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 22\r\n\r\nconvnext_queue_depth 0")
        await writer.drain()
        writer.close()

    async def main():
        async with _serving(handler) as port:
            url = f"http://127.0.0.1:{port}"
            connection = Connection.for_url(url)
            assert await connection.send(prepare_get(f"{url}/metrics")) == (200, b"convnext_queue_depth 0")
            await connection.close()

    asyncio.run(main())
    assert seen[0].startswith(b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1:") and seen[0].endswith(b"\r\n\r\n")


def test_the_blocking_client_keeps_alive_replaces_a_closed_connection_and_reads_split_answers():
    """bench/lone_request.py's client: one request at a time on a plain socket."""
    connections = 0

    async def handler(reader, writer):
        nonlocal connections
        connections += 1
        await _read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-")  # the head and body arrive in pieces
        await writer.drain()
        await asyncio.sleep(0.01)
        writer.write(b"Length: 5\r\n\r\nhe")
        await writer.drain()
        await asyncio.sleep(0.01)
        writer.write(b"llo")
        await writer.drain()
        await _read_request(reader)
        writer.write(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n")
        await writer.drain()
        writer.close()  # then an idle close: the next request goes on a new connection

    def client(url: str) -> list:
        connection = BlockingConnection(url)
        request = prepare_post(url, b"x")
        answers = [connection.send(request), connection.send(request)]
        time.sleep(0.05)  # the server's FIN arrives
        answers.append(connection.send(request))
        connection.close()
        return answers

    async def main():
        async with _serving(handler) as port:
            return await asyncio.to_thread(client, f"http://127.0.0.1:{port}/classify")

    assert asyncio.run(main()) == [(200, b"hello"), (404, b""), (200, b"hello")]
    assert connections == 2


def test_a_server_that_accepts_and_never_answers_ends_a_lone_request_run_instead_of_blocking_it():
    """bench/lone_request.py against a silent server: its socket timeout, an HttpError, then a one-line RuntimeError."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()  # the kernel accepts the connection; nothing reads the request or answers
        url = f"http://127.0.0.1:{server.getsockname()[1]}/classify"
        with pytest.raises(HttpError, match=r"no answer from 127\.0\.0\.1:\d+ within 0\.3 s"):
            BlockingConnection(url, timeout_s=0.3).send(prepare_post(url, b"x"))
        with pytest.raises(RuntimeError, match=r"lone request 1 to http://127\.0\.0\.1:\d+/classify failed: no answer"):
            lone_requests(url, [b"x" * 100], 3, timeout_s=0.3)
