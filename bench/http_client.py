"""A lean asyncio HTTP/1.1 client for the load generator: keep-alive connections, prebuilt request bytes.

On a machine whose cores the server shares with the load generator, every millisecond of client CPU is taken from
the server being measured; httpx costs about 1 ms of CPU per request, this client about a tenth of that, so the
numbers describe the server. It speaks only what the benchmark needs: POST with Content-Length and a bare GET,
responses with Content-Length or chunked bodies, and it re-opens a connection the server closed.
"""
from __future__ import annotations

import asyncio
import socket
import uuid
from collections.abc import Coroutine, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import urlparse

T = TypeVar("T")


class HttpError(Exception):
    """The server's answer was not a well-formed HTTP/1.1 response, or the connection broke."""


class _NoResponse(Exception):
    """The connection ended before any byte of a response (a stale keep-alive connection, or a refused one)."""


@dataclass(frozen=True)
class PreparedRequest:
    """One request, encoded once and sent many times."""

    data: bytes


def prepare_post(url: str, body: bytes, content_type: str = "image/jpeg", form_field: str | None = None,
                 headers: Mapping[str, str] | None = None) -> PreparedRequest:
    """POST `body` raw, or as the file of a multipart form field (for servers that only parse forms), with `headers`
    besides (an API key)."""
    parsed = urlparse(url)
    if form_field:
        boundary = uuid.uuid4().hex
        body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"{form_field}\"; filename=\"image.jpg\"\r\n"
                f"Content-Type: {content_type}\r\n\r\n").encode() + body + f"\r\n--{boundary}--\r\n".encode()
        content_type = f"multipart/form-data; boundary={boundary}"
    extra = "".join(f"{name}: {value}\r\n" for name, value in (headers or {}).items())
    head = (f"POST {parsed.path or '/'} HTTP/1.1\r\nHost: {parsed.netloc}\r\nContent-Type: {content_type}\r\n"
            f"{extra}Content-Length: {len(body)}\r\n\r\n").encode()
    return PreparedRequest(head + body)


def prepare_get(url: str) -> PreparedRequest:
    """GET `url`'s path (a /metrics scrape)."""
    parsed = urlparse(url)
    return PreparedRequest(f"GET {parsed.path or '/'} HTTP/1.1\r\nHost: {parsed.netloc}\r\n\r\n".encode())


class Connection:
    """One keep-alive connection to host:port; `send` returns (status, body)."""

    def __init__(self, host: str, port: int):
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    @classmethod
    def for_url(cls, url: str) -> Connection:
        parsed = urlparse(url)
        return cls(parsed.hostname or "127.0.0.1", parsed.port or 80)

    async def send(self, request: PreparedRequest) -> tuple[int, bytes]:
        # A kept-alive connection the server has closed meanwhile (its idle timeout) is replaced before use, and a
        # reused one that ends before the first response byte (the close raced the request) is retried once on a
        # new connection, as HTTP clients do; a failure after the response started is an error.
        reused = self.writer is not None and not self.writer.is_closing() and not self.reader.at_eof()
        if not reused:
            await self._reconnect()
        try:
            return await self._exchange(request)
        except _NoResponse as err:
            if not reused:
                raise HttpError(str(err)) from None
        await self._reconnect()
        try:
            return await self._exchange(request)
        except _NoResponse as err:
            raise HttpError(str(err)) from None

    async def _reconnect(self) -> None:
        await self.close()
        self.reader, self.writer = await asyncio.open_connection(self.host, self.port)

    async def _exchange(self, request: PreparedRequest) -> tuple[int, bytes]:
        try:
            self.writer.write(request.data)
            status, headers = await self._read_head()
        except (ConnectionError, asyncio.IncompleteReadError) as err:
            await self.close()
            if getattr(err, "partial", b""):
                raise HttpError(f"{type(err).__name__}: {err}") from None
            raise _NoResponse(f"{type(err).__name__}: the connection ended before a response") from None
        except (asyncio.LimitOverrunError, ValueError) as err:
            await self.close()
            raise HttpError(f"{type(err).__name__}: {err}") from None
        try:
            body = await self._read_body(headers)
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError) as err:
            await self.close()
            raise HttpError(f"{type(err).__name__}: {err}") from None
        if headers.get("connection", "").lower() == "close":
            await self.close()
        return status, body

    async def _read_head(self) -> tuple[int, dict[str, str]]:
        head = await self.reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        parts = lines[0].split(" ", 2)
        if len(parts) < 2 or not parts[0].startswith("HTTP/1."):
            raise ValueError(f"not an HTTP/1.x status line: {lines[0]!r}")
        headers = {}
        for line in lines[1:]:
            if ":" in line:
                name, value = line.split(":", 1)
                headers[name.strip().lower()] = value.strip()
        return int(parts[1]), headers

    async def _read_body(self, headers: dict[str, str]) -> bytes:
        if "content-length" in headers:
            return await self.reader.readexactly(int(headers["content-length"]))
        if headers.get("transfer-encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int((await self.reader.readuntil(b"\r\n")).split(b";")[0], 16)
                chunk = await self.reader.readexactly(size + 2)  # data + CRLF
                if size == 0:
                    return b"".join(chunks)
                chunks.append(chunk[:-2])
        raise ValueError("response has neither Content-Length nor chunked encoding")

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            try:
                await self.writer.wait_closed()
            except ConnectionError:
                pass
        self.reader = self.writer = None


class BlockingConnection:
    """One keep-alive connection on a plain blocking socket, for one request at a time: no event loop, so the
    client's own time in a lone request's latency is a send, a few recv calls and one header parse. A server that
    accepts and then sends nothing for `timeout_s` (connecting, sending or between received bytes) is an HttpError,
    not a benchmark blocked for good; 60 s, as the load generators' per-request timeout."""

    def __init__(self, url: str, timeout_s: float = 60.0):
        parsed = urlparse(url)
        self.address = (parsed.hostname or "127.0.0.1", parsed.port or 80)
        self.timeout_s = timeout_s
        self.sock: socket.socket | None = None
        self.buffer = b""

    def send(self, request: PreparedRequest) -> tuple[int, bytes]:
        reused = self.sock is not None
        try:
            return self._timed_exchange(request)
        except (_NoResponse, ConnectionError) as err:
            self.close()
            if not reused:  # a kept-alive connection the server had closed is replaced once, as in Connection.send
                raise HttpError(str(err)) from None
        try:
            return self._timed_exchange(request)
        except (_NoResponse, ConnectionError) as err:
            self.close()
            raise HttpError(str(err)) from None

    def _timed_exchange(self, request: PreparedRequest) -> tuple[int, bytes]:
        """_exchange, with the socket's timeout as an HttpError (never retried: the server is there, not answering)."""
        try:
            return self._exchange(request)
        except TimeoutError:  # socket.timeout
            self.close()
            raise HttpError(f"no answer from {self.address[0]}:{self.address[1]} within {self.timeout_s:g} s (its "
                            "socket timeout)") from None

    def _exchange(self, request: PreparedRequest) -> tuple[int, bytes]:
        if self.sock is None:
            self.sock = socket.create_connection(self.address, timeout=self.timeout_s)  # every later call too
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.buffer = b""
        self.sock.sendall(request.data)
        if not self._receive():
            raise _NoResponse("the connection ended before a response")
        while (end := self.buffer.find(b"\r\n\r\n")) < 0:
            self._receive_more()
        head, self.buffer = self.buffer[:end].decode("latin-1"), self.buffer[end + 4:]
        lines = head.split("\r\n")
        headers = {name.strip().lower(): value.strip()
                   for name, _, value in (line.partition(":") for line in lines[1:])}
        if "content-length" not in headers:
            raise HttpError("response without Content-Length")
        length = int(headers["content-length"])
        while len(self.buffer) < length:
            self._receive_more()
        body, self.buffer = self.buffer[:length], self.buffer[length:]
        if headers.get("connection", "").lower() == "close":
            self.close()
        return int(lines[0].split(" ", 2)[1]), body

    def _receive(self) -> bool:
        chunk = self.sock.recv(1 << 20)  # type: ignore[union-attr]
        self.buffer += chunk
        return bool(chunk)

    def _receive_more(self) -> None:
        if not self._receive():
            self.close()
            raise HttpError("the connection ended in the middle of a response")

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None


def run_client(coroutine: Coroutine[Any, Any, T]) -> T:
    """asyncio.run, on uvloop where it is installed (the serve extra brings it): less of the client's own time in
    every latency it measures, and less of the shared cores taken from the server."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coroutine)
    return uvloop.run(coroutine)
