"""The HTTP access log: uvicorn's line per request ("client - "METHOD path HTTP/v" status", the `uvicorn.access`
logger, so its handlers and format apply), written by a thread. uvicorn's own access log builds and writes each line
on the event loop before the response's first byte (~0.2 ms of a lone request on a 2-core EPYC); here the loop only
queues the request's scope and status."""
from __future__ import annotations

import logging
import queue
import threading
from typing import TYPE_CHECKING, cast

from starlette.types import Scope
from uvicorn.protocols.utils import get_client_addr, get_path_with_query_string

if TYPE_CHECKING:
    from uvicorn._types import HTTPScope

LOGGER = logging.getLogger("uvicorn.access")
MAX_QUEUED_LINES = 10_000  # beyond this (a stalled stdout, say) lines are dropped and counted, never held without end


class AccessLog:
    def __init__(self) -> None:
        self._entries: queue.SimpleQueue[tuple[Scope, int] | None] = queue.SimpleQueue()
        self._writer: threading.Thread | None = None
        self._lock = threading.Lock()
        self.dropped = 0  # lines not written because the queue was full

    def record(self, scope: Scope, status: int) -> None:
        """From the event loop: one answered request (nothing when the logger is off, e.g. at log level warning)."""
        if not LOGGER.isEnabledFor(logging.INFO):
            return
        if self._writer is None:
            self._start()
        if self._entries.qsize() >= MAX_QUEUED_LINES:
            self.dropped += 1
            return
        self._entries.put((scope, status))

    def flush(self) -> None:
        """Write every queued line and stop the writer (the next record starts one again)."""
        with self._lock:
            writer, self._writer = self._writer, None
            if writer is not None:
                self._entries.put(None)
                writer.join()

    def _start(self) -> None:
        with self._lock:
            if self._writer is None:
                self._writer = threading.Thread(target=self._write, name="access-log", daemon=True)
                self._writer.start()

    def _write(self) -> None:
        while (entry := self._entries.get()) is not None:
            scope, status = entry
            http_scope = cast("HTTPScope", scope)  # only HTTP requests are recorded
            try:
                LOGGER.info('%s - "%s %s HTTP/%s" %d', get_client_addr(http_scope), scope["method"],
                            get_path_with_query_string(http_scope), scope["http_version"], status)
            except Exception:  # one line that cannot be formatted must not end the writer (the queue would only grow)
                self.dropped += 1


ACCESS_LOG = AccessLog()  # one per process, as the logger it writes to
