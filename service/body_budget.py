"""One bound on the memory that request bodies hold, all requests together (HTTP bodies and gRPC messages).

max_body_bytes bounds one body and max_connections the requests at once, but their product (512 x 20 MiB = 10 GiB
by default) is more than a container's memory: slow uploads from many clients could have the process killed for
memory. Every HTTP body chunk is counted as it arrives and given back when its request has been answered; a chunk
that does not fit in max_buffered_body_bytes ends its request with 503 body_buffer_full + Retry-After (and the
connection closes, its body unread). What a body becomes in memory besides is counted into the same request's share
(`count_copy`): a gzip body's decompressed bytes beyond the compressed ones (20 KB on the wire can be 20 MiB), a
multipart form's file contents. A gRPC message, which gRPC reads whole before the handler runs, is counted from
then until answered (UNAVAILABLE when it does not fit), so a flood of them under overload is refused instead of
held for the request timeout. With room, counting is two additions per chunk.
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

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
        self.held_bytes = 0

    def take(self, size: int) -> None:
        """Count `size` more bytes in, or raise the 503 that ends the request reading them."""
        if self.held_bytes + size > self.limit_bytes:
            raise ApiError(503, "body_buffer_full", f"the service holds {self.held_bytes} bytes of request bodies "
                           f"(limit {self.limit_bytes}, max_buffered_body_bytes); retry later",
                           headers={"Retry-After": RETRY_AFTER_S, "Connection": "close"})
        self.held_bytes += size

    def give_back(self, size: int) -> None:
        self.held_bytes -= size

    @contextmanager
    def held(self, size: int) -> Iterator[None]:
        """`size` bytes counted in for the block (a gRPC message, read whole before its handler runs)."""
        self.take(size)
        try:
            yield
        finally:
            self.give_back(size)


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
        Gauge("convnext_buffered_body_bytes", "bytes of request bodies held in memory now (max_buffered_body_bytes "
              "bounds them)", registry=metrics.registry).set_function(lambda: float(budget.held_bytes))

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
