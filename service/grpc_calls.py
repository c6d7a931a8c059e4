"""The gRPC calls being handled: at most max_connections at once, as HTTP requests are.

The bound is kept here, in the handler, not by grpc core (the server's maximum_concurrent_rpcs): core refuses a call
past its limit with RESOURCE_EXHAUSTED before any handler runs, so the refusal was in no metric and carried no retry
hint. Here it is refused as the HTTP side refuses a request past the limit (503 too_many_connections with
Retry-After: UNAVAILABLE with grpc-retry-pushback-ms), counted like every other refusal, before its key is checked or
its message read.
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from service.errors import ApiError


class CallsInFlight:
    """Calls in flight, within `limit`. Owned by the event loop (single-threaded: no lock)."""

    def __init__(self, limit: int):
        self.limit = limit
        self.count = 0

    @contextmanager
    def held(self, probe: bool = False) -> Iterator[None]:
        """One call in flight until the block ends. Past the limit, 503 too_many_connections; never for a probe: as
        over HTTP, a health check refused under load would get a busy, healthy server restarted."""
        if self.count >= self.limit and not probe:
            raise ApiError(503, "too_many_connections", f"the server is at its limit of {self.limit} calls in flight "
                           "(max_connections); retry shortly", headers={"Retry-After": "1"})
        self.count += 1
        try:
            yield
        finally:
            self.count -= 1
