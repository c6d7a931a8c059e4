"""Lingering close (nginx's `lingering_close`, Apache's lingering close): an answer sent before the request was read
reaches the client before its connection closes.

Closing a socket with unread bytes in its receive buffer makes Linux send a reset instead of a FIN (and bytes that
arrive after the close are answered with one), so the client still uploading a body the server has refused (413
over max_body_bytes, 503 at the connection limit, 408, 401, 404 ...) gets ECONNRESET or a broken pipe from its send
and never reads the JSON error. So after such an answer the write side is shut (the FIN follows the answer's bytes) and
what the client still sends is read and dropped, never kept, until it stops (its FIN, or LINGERING_TIMEOUT_S of
silence) or LINGERING_TIME_S have passed in all; then the socket closes. Meanwhile the connection stays open, and
counted against max_connections: a flood of refused uploads cannot get past the limit. At most max_connections
connections linger at once (LingeringConnections): beyond that, one closes at once, as before, so a flood of refused
uploads cannot hold more sockets open than the server would serve.
"""
from __future__ import annotations

import asyncio
from typing import Any

# nginx lingers up to 30 s in all (lingering_time) and 5 s of silence (lingering_timeout), Apache 30 s and 2 s. Shorter
# here: a lingering connection holds a max_connections slot and delays a shutdown. The cost: a client on a slow link
# still uploading LINGERING_TIME_S after its answer is cut off, and may miss that answer as before.
LINGERING_TIME_S = 5.0
LINGERING_TIMEOUT_S = 2.0


class LingeringConnections:
    """How many connections of one server linger now, and the most that may (None: no bound)."""

    def __init__(self, limit: int | None):
        self.now, self.limit = 0, limit

    def room(self) -> bool:
        return self.limit is None or self.now < self.limit


class LingeringTransport(asyncio.Transport):
    """A connection's transport as uvicorn's protocol sees it: the same, except that `close()` lingers once
    `linger_on_close` is set (the protocol sets it when it answers before the request has all arrived).

    While lingering, `is_closing()` is true (uvicorn arms no keep-alive timer and starts no next request), the
    protocol hands what it receives to `discard` instead of its parser, and writes are dropped (the write side is shut:
    a request still running on a connection closed by uvicorn's own 400 would raise writing its answer).
    When `lingering_connections` has no room left, close() closes at once."""

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop,
                 lingering_connections: LingeringConnections):
        super().__init__()
        self.transport, self.loop, self.lingering_connections = transport, loop, lingering_connections
        self.linger_on_close = False
        self.lingering = False
        self._deadline = self._last_read = self._quiet_s = 0.0
        self._timer: asyncio.TimerHandle | None = None

    def close(self) -> None:
        if self.lingering:
            return  # closing already, within its bounds
        if not self.linger_on_close or self.transport.is_closing() or not self.lingering_connections.room():
            self.transport.close()
            return
        self.lingering = True
        self.lingering_connections.now += 1
        # Read at each start, not bound at import: the tests shorten them.
        now, self._quiet_s = self.loop.time(), LINGERING_TIMEOUT_S
        self._deadline, self._last_read = now + LINGERING_TIME_S, now
        if self.transport.can_write_eof():  # not over TLS
            self.transport.write_eof()  # asyncio and uvloop send the FIN once the answer's bytes are out
        self.transport.resume_reading()  # uvicorn pauses reading while a body waits for the app
        self._timer = self.loop.call_at(min(now + self._quiet_s, self._deadline), self._check)

    def discard(self) -> None:
        """The protocol received bytes while lingering and dropped them: the client is not silent yet."""
        self._last_read = self.loop.time()

    def connection_lost(self) -> None:
        """The socket is closed (by the client's FIN, a reset, or the bound): no timer is left behind."""
        if self.lingering:
            self.lingering_connections.now -= 1
        self.lingering = False
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _check(self) -> None:
        # One timer, moved on when bytes arrived meanwhile: no timer is re-armed per chunk received.
        next_check = min(self._last_read + self._quiet_s, self._deadline)
        if self.loop.time() < next_check:
            self._timer = self.loop.call_at(next_check, self._check)
            return
        self._timer = None
        if self.transport.get_write_buffer_size():
            self.transport.abort()  # the answer is still unsent (a client that never reads): it must not hold on
        else:
            self.transport.close()

    # The rest of asyncio.Transport, as the wrapped transport does it.
    def is_closing(self) -> bool:
        return self.lingering or self.transport.is_closing()

    def abort(self) -> None:
        self.transport.abort()

    def write(self, data: Any) -> None:
        if not self.lingering:
            self.transport.write(data)

    def writelines(self, list_of_data: Any) -> None:
        if not self.lingering:
            self.transport.writelines(list_of_data)

    def write_eof(self) -> None:
        self.transport.write_eof()

    def can_write_eof(self) -> bool:
        return self.transport.can_write_eof()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self.transport.get_extra_info(name, default)

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self.transport.set_protocol(protocol)

    def get_protocol(self) -> asyncio.BaseProtocol:
        return self.transport.get_protocol()

    def is_reading(self) -> bool:
        return self.transport.is_reading()

    def pause_reading(self) -> None:
        self.transport.pause_reading()

    def resume_reading(self) -> None:
        self.transport.resume_reading()

    def get_write_buffer_size(self) -> int:
        return self.transport.get_write_buffer_size()

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return self.transport.get_write_buffer_limits()

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self.transport.set_write_buffer_limits(high, low)
