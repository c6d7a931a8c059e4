"""A real asyncio HTTP/1.1 server for the load generators' tests: it reads each request (head + Content-Length body)
and answers every one with the same bytes, after an optional delay or at the next tick of a clock."""
from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Awaitable, Callable

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


def answering(response: bytes, delay_s: float = 0.0, period_s: float = 0.0,
              received: list[bytes] | None = None,
              respond: Callable[[bytes], Awaitable[bytes]] | None = None) -> Handler:
    """An asyncio.start_server handler that answers each request on a connection with `response`, after `delay_s`, or
    (period_s) at the next tick of a clock ticking every period_s from half a period after this call: the requests
    waiting then are answered together, as a batching server answers a batch. `received` collects each body;
    `respond`, given, answers each body in place of `response` (whatever it returns, when it returns it)."""
    epoch = time.perf_counter() + period_s / 2

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                              if line.lower().startswith(b"content-length"))
                body = await reader.readexactly(length)
                if received is not None:
                    received.append(body)
                if delay_s:
                    await asyncio.sleep(delay_s)
                if period_s:
                    now = time.perf_counter()
                    await asyncio.sleep(epoch + math.ceil((now - epoch) / period_s) * period_s - now)
                writer.write(response if respond is None else await respond(body))
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()

    return handle
