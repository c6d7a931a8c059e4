"""The HTTP access log: uvicorn's line per request ("client - "METHOD path HTTP/v" status"), then the request's id
(service/request_ids.py), on the `uvicorn.access` logger, so its handlers and format apply; written by a thread.
uvicorn's own access log builds and writes each line on the event loop before the response's first byte (~0.2 ms of a
lone request on a 2-core EPYC); here the loop only queues the request's scope and status."""
from __future__ import annotations

import logging
import queue
import threading
import time
from copy import copy
from typing import TYPE_CHECKING, cast

from starlette.types import Scope
from uvicorn.logging import AccessFormatter
from uvicorn.protocols.utils import get_client_addr, get_path_with_query_string

from service.request_ids import NO_REQUEST_ID, REQUEST_ID_SCOPE_KEY

if TYPE_CHECKING:
    from uvicorn._types import HTTPScope

LOGGER = logging.getLogger("uvicorn.access")
WARNINGS = logging.getLogger("convnext.service")  # on stderr beside uvicorn's own lines, not in the stalled access log
MAX_QUEUED_LINES = 10_000  # beyond this (a stalled stdout, say) lines are dropped and counted, never held without end
FLUSH_TIMEOUT_S = 10.0  # how long the flush at shutdown waits for the writer
DROPPED_WARNING_INTERVAL_S = 60.0  # at most one warning of dropped lines this often (and one at the flush)


class AccessLog:
    """Lines dropped are counted (`dropped`: convnext_access_log_dropped_total, service/metrics.py) and warned of."""

    def __init__(self) -> None:
        self._entries: queue.SimpleQueue[tuple[Scope, int] | None] = queue.SimpleQueue()
        self._writer: threading.Thread | None = None
        self._lock = threading.Lock()
        # Each counted by one thread only (no increment lost between them): the event loop's and the writer's; the
        # warning's two fields are the event loop's.
        self._dropped_queue_full = 0
        self._dropped_unformattable = 0
        self._warned_dropped = 0  # of `dropped`, what a warning has already told
        self._next_warning = 0.0  # time.monotonic() from which the next warning may go

    @property
    def dropped(self) -> int:
        """Lines not written: the queue was full, or the line could not be formatted."""
        return self._dropped_queue_full + self._dropped_unformattable

    def record(self, scope: Scope, status: int) -> None:
        """From the event loop: one answered request (nothing when the logger is off, e.g. at log level warning)."""
        if not LOGGER.isEnabledFor(logging.INFO):
            return
        if self._writer is None:
            self._start()
        if self._entries.qsize() >= MAX_QUEUED_LINES:
            self._dropped_queue_full += 1
        else:
            self._entries.put((scope, status))
        if self.dropped != self._warned_dropped and time.monotonic() >= self._next_warning:
            self._warn_of_drops()

    def flush(self) -> None:
        """Write every queued line and stop the writer (the next record starts one again); behind an output stalled
        for FLUSH_TIMEOUT_S, say how many lines were left and go on (the process is ending: a stalled stdout must not
        hold its exit)."""
        with self._lock:
            writer, self._writer = self._writer, None
            if writer is not None:
                self._entries.put(None)
                writer.join(FLUSH_TIMEOUT_S)
                if writer.is_alive():
                    WARNINGS.warning("the access log's output took no line for %g s: about %d lines left unwritten",
                                     FLUSH_TIMEOUT_S, self._entries.qsize())
            self._warn_of_drops()

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
                # The id as a record attribute, not a 6th argument: uvicorn's AccessFormatter unpacks exactly 5.
                # A '"' in the query string (the path's is %-escaped) would end the quoted request field early.
                target = get_path_with_query_string(http_scope).replace('"', "%22")
                LOGGER.info('%s - "%s %s HTTP/%s" %d', get_client_addr(http_scope), scope["method"], target,
                            scope["http_version"], status,
                            extra={"request_id": scope.get(REQUEST_ID_SCOPE_KEY, NO_REQUEST_ID)})
            except Exception:  # one line that cannot be formatted must not end the writer (the queue would only grow)
                self._dropped_unformattable += 1

    def _warn_of_drops(self) -> None:
        """From the event loop, never the writer (which a stalled stdout holds in its line): at a record, at most once
        per DROPPED_WARNING_INTERVAL_S, and at the flush: the lines dropped since the last warning, if any."""
        dropped = self.dropped
        if dropped == self._warned_dropped:
            return
        WARNINGS.warning("%d access log lines dropped (%d since the start): more than %d lines were waiting for the "
                         "log's output (a stalled stdout?), or a line could not be formatted",
                         dropped - self._warned_dropped, dropped, MAX_QUEUED_LINES)
        self._warned_dropped = dropped
        self._next_warning = time.monotonic() + DROPPED_WARNING_INTERVAL_S


class AccessLineFormatter(AccessFormatter):
    """uvicorn's access format, whose `%(request_id)s` (service/server.py's log_config ends the line with it) reads
    "-" on a record without one (uvicorn's own access logger, a line logged by other code), instead of failing."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        if not hasattr(record, "request_id"):
            record = copy(record)
            record.request_id = NO_REQUEST_ID
        return super().formatMessage(record)


ACCESS_LOG = AccessLog()  # one per process, as the logger it writes to
