"""The gRPC calls being handled: at most max_connections at once, as HTTP requests are; and the shutdown's end of
those still running when its grace period is over.

The bound is kept here, in the handler, not by grpc core (the server's maximum_concurrent_rpcs): core refuses a call
past its limit with RESOURCE_EXHAUSTED before any handler runs, so the refusal was in no metric and carried no retry
hint. Here it is refused as the HTTP side refuses a request past the limit (503 too_many_connections with
Retry-After: UNAVAILABLE with grpc-retry-pushback-ms), counted like every other refusal, before its key is checked or
its message read.

The calls left at the end of the shutdown's grace period are ended here too, not by grpc core's stop, which resets
them (their clients get UNAVAILABLE or INTERNAL with no code or retry hint; the handlers a cancellation that reads like
a client leaving or, while a message arrives, like a message too large): each is cancelled, and answered UNAVAILABLE
shutting_down with a retry hint (grpc_server._Method).
"""
from __future__ import annotations

import asyncio
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from service.errors import ApiError


class CallsInFlight:
    """Calls in flight, within `limit`. Owned by the event loop (single-threaded: no lock)."""

    def __init__(self, limit: int):
        self.limit = limit
        self._tasks: set[asyncio.Task[Any]] = set()  # each call's own task (grpc.aio runs a call in one)
        # The calls cancelled by the shutdown at its grace's end; any other cancellation is grpc's (the client left, its
        # deadline passed), even one that arrives after them.
        self._cut_off: set[asyncio.Task[Any]] = set()

    @property
    def count(self) -> int:
        return len(self._tasks)

    @contextmanager
    def held(self, probe: bool = False) -> Iterator[None]:
        """The calling task is a call in flight until the block ends. Past the limit, 503 too_many_connections; never
        for a probe: as over HTTP, a health check refused under load would get a busy, healthy server restarted."""
        if len(self._tasks) >= self.limit and not probe:
            raise ApiError(503, "too_many_connections", f"the server is at its limit of {self.limit} calls in flight "
                           "(max_connections); retry shortly", headers={"Retry-After": "1"})
        task = asyncio.current_task()
        if task is None:
            raise RuntimeError("CallsInFlight.held is for a call's handler, which runs in its own task")
        self._tasks.add(task)
        try:
            yield
        finally:
            self._tasks.discard(task)

    def cut_off_all(self) -> None:
        """The shutdown's grace period is over: every call still in flight is cancelled, to be answered UNAVAILABLE
        shutting_down."""
        self._cut_off.update(self._tasks)
        for task in self._tasks:
            task.cancel()

    def was_cut_off(self) -> bool:
        """The calling task's call was cancelled by cut_off_all (asked once it was cancelled, to say by whom)."""
        return asyncio.current_task() in self._cut_off
