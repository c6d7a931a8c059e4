"""One bound on the memory that request bodies hold, all requests together (HTTP bodies and gRPC messages).

max_body_bytes bounds one body and max_connections the requests at once, but their product (512 x 20 MiB = 10 GiB
by default) is more than a container's memory: slow uploads from many clients could have the process killed for
memory. Every HTTP body chunk is counted as it arrives and given back when its request has been answered; a chunk
that does not fit in max_buffered_body_bytes ends its request with 503 body_buffer_full + Retry-After (and the
connection closes, its body unread). What a body becomes in memory besides is counted into the same request's share
(`count_copy`): a gzip body's decompressed bytes beyond the compressed ones (20 KB on the wire can be 20 MiB), a
multipart form's file contents. A gRPC message arrives whole, its size unknown until then, and grpc core takes in up
to its declared size once asked for it: room for max_body_bytes is held (`reserve`) before it is asked for, waiting
first come first served while messages still arriving hold the room, and becomes the message's own size once it has
arrived (`received`), counted until answered. With room, counting is two additions per chunk.
"""
from __future__ import annotations

import asyncio
from collections import deque

from prometheus_client import Gauge
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.admission import RETRY_AFTER_S
from service.errors import ApiError
from service.metrics import ServiceMetrics

REQUEST_SHARE = "convnext.body_share"  # the scope key of a request's BodyShare


class BodyBudget:
    """Bytes of request bodies in memory, within a limit. Owned by the event loop (single-threaded: no lock)."""

    def __init__(self, limit_bytes: int):
        self.limit_bytes = limit_bytes
        self.held_bytes = 0  # bodies received, and the room reserved for gRPC messages still arriving
        self.reserved_bytes = 0  # of held_bytes: reserved, not received
        self._waiting: deque[tuple[int, asyncio.Future[None]]] = deque()  # reservations, in arrival order

    def take(self, size: int) -> None:
        """Count `size` more bytes in, or raise the 503 that ends the request reading them."""
        if self.held_bytes + size > self.limit_bytes:
            raise self._full()
        self.held_bytes += size

    def give_back(self, size: int) -> None:
        self.held_bytes -= size
        self._grant_waiting()

    async def reserve(self, size: int, deadline: float) -> None:
        """Hold `size` bytes of room for a message still to arrive (a gRPC message, before grpc is asked for it).

        While other messages still arriving hold the room (in moments they are received, at their own size, or
        their calls end), wait for it, first come first served, until `deadline` (the event loop's clock). 503
        body_buffer_full at the deadline, or at once when bodies already received leave no room for `size`, as
        an HTTP body chunk that does not fit is refused. received() ends the reservation."""
        if self._received_too_much(size):
            raise self._full()
        if not self._waiting and self.held_bytes + size <= self.limit_bytes:
            self._hold(size)
            return
        granted = asyncio.get_running_loop().create_future()
        self._waiting.append((size, granted))
        try:
            async with asyncio.timeout_at(deadline):
                await granted
        except BaseException as err:  # past the deadline, refused, or its call ended (cancelled)
            if granted.done() and not granted.cancelled() and granted.exception() is None:
                self.received(size, 0)  # granted just as its wait ended: the room goes to the next in line
            else:
                self._grant_waiting()  # its place in line is given up
            if isinstance(err, TimeoutError):
                raise self._full("no room came for the message before its deadline (body_deadline_s): ") from None
            raise

    def received(self, reserved: int, size: int) -> None:
        """A reserved message has arrived, `size` bytes (at most `reserved`; 0: none came): those stay counted."""
        self.reserved_bytes -= reserved
        self.give_back(reserved - size)

    def _hold(self, size: int) -> None:
        self.held_bytes += size
        self.reserved_bytes += size

    def _received_too_much(self, size: int) -> bool:
        return self.held_bytes - self.reserved_bytes + size > self.limit_bytes

    def _grant_waiting(self) -> None:
        """Reservations that fit now, in arrival order; those bodies already received leave no room for: refused."""
        while self._waiting:
            size, granted = self._waiting[0]
            if granted.done():  # its wait has ended
                pass
            elif self._received_too_much(size):
                granted.set_exception(self._full())
            elif self.held_bytes + size <= self.limit_bytes:
                self._hold(size)
                granted.set_result(None)
            else:
                return
            self._waiting.popleft()

    def _full(self, why: str = "") -> ApiError:
        received = self.held_bytes - self.reserved_bytes
        return ApiError(503, "body_buffer_full", f"{why}the service holds {received} bytes of request bodies and "
                        f"{self.reserved_bytes} reserved for gRPC messages still arriving (limit {self.limit_bytes}, "
                        "max_buffered_body_bytes); retry later",
                        headers={"Retry-After": RETRY_AFTER_S, "Connection": "close"})


class BodyShare:
    """The bytes one HTTP request holds of the budget: taken as they arrive, given back at once when it is answered."""

    def __init__(self, budget: BodyBudget):
        self.budget, self.held_bytes = budget, 0

    def take(self, size: int) -> None:
        self.budget.take(size)
        self.held_bytes += size


def count_copy(scope: Scope, size: int) -> None:
    """Count `size` bytes more into the request's share: a copy of its body that lives until the answer (503
    body_buffer_full when they do not fit). Outside the middleware (no share), nothing to count."""
    share: BodyShare | None = scope.get(REQUEST_SHARE)
    if share is not None and size > 0:
        share.take(size)


class BodyBudgetMiddleware:
    """Pure ASGI: counts each HTTP request's body chunks into the BodyBudget as the route reads them (the 503 is
    raised from `receive`, so it reaches the route's exception handlers like any ApiError) and gives them back once
    the request has been answered."""

    def __init__(self, app: ASGIApp, budget: BodyBudget, metrics: ServiceMetrics):
        self.app, self.budget = app, budget
        Gauge("convnext_buffered_body_bytes", "bytes of request bodies held in memory now, with the max_body_bytes "
              "held for each gRPC message being received (max_buffered_body_bytes bounds them)",
              registry=metrics.registry).set_function(lambda: float(budget.held_bytes))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        share = scope[REQUEST_SHARE] = BodyShare(self.budget)

        async def counted_receive() -> Message:
            message = await receive()
            if message["type"] == "http.request":
                count_copy(scope, len(message.get("body", b"")))
            return message

        try:
            await self.app(scope, counted_receive, send)
        finally:
            self.budget.give_back(share.held_bytes)
