"""A real asyncio HTTP/1.1 server for the load generators' tests: it reads each request (head + Content-Length body)
and answers every one with the same bytes, after an optional delay."""
from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


def answering(response: bytes, delay_s: float = 0.0) -> Handler:
    """An asyncio.start_server handler that answers each request on a connection with `response`."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                              if line.lower().startswith(b"content-length"))
                await reader.readexactly(length)
                if delay_s:
                    await asyncio.sleep(delay_s)
                writer.write(response)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()

    return handle
