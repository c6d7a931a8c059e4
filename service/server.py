"""The uvicorn server set-up: a header read timeout (against slowloris), JSON 503 beyond max_connections, and a
lingering close after an answer sent while the client was still sending its request."""
from __future__ import annotations

import asyncio
import copy
import json
import logging
import math
import re
import sys
import time
import urllib.parse
from typing import TYPE_CHECKING

import uvicorn
from fastapi import FastAPI
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.config import LOGGING_CONFIG
from uvicorn.protocols.http.auto import AutoHTTPProtocol
from uvicorn.server import STARTUP_FAILURE

from service.access_log import ACCESS_LOG, AccessLineFormatter
from service.app import begin_drain
from service.errors import error_body, send_error, speaks_v2
from service.lingering_close import LINGERING_TIME_S, LingeringConnections, LingeringTransport
from service.listen_socket import bind_refusal, bound_socket, is_ipv6_wildcard
from service.metrics import SERVER_ANSWER_SCOPE_KEY, ServiceMetrics
from service.request_ids import REQUEST_ID_SCOPE_KEY, request_id_of_headers
from service.security import NOSNIFF
from service.settings import Settings

# Answered beyond max_connections too: orchestrators' health checks and Prometheus, cheap and needed most under load.
PROBE_PATHS = frozenset({"/healthz", "/readyz", "/metrics", "/v2/health/live", "/v2/health/ready"})
# A request line + headers beyond this is refused (431): uvicorn's httptools protocol appends the URL piece by piece,
# so a multi-MB URL sent in small segments costs the event loop quadratic time before any route or key check.
MAX_HEAD_BYTES = 64 * 1024
HEAD_TOO_LARGE_MESSAGE = f"the request line and headers are over {MAX_HEAD_BYTES} bytes"
MAX_SOCKET_READ_BYTES = 256 * 1024  # the most one data_received brings (asyncio's and uvloop's read size)
# Of a request head the server refuses itself before it is complete (431, 400): what the request metrics and the
# access log are told of it, from its request line (RFC 9112 3: method SP target SP version; empty lines before it
# are allowed).
KEPT_HEAD_BYTES = 1024
REQUEST_LINE = re.compile(rb"(?:\r?\n)*([!#$%&'*+.^_`|~0-9A-Za-z-]+) ([^ \r\n]*)(?: HTTP/([0-9]\.[0-9])\r?\n)?")
UVICORN_LOG = logging.getLogger("uvicorn.error")  # uvicorn's own start and error lines

if TYPE_CHECKING:  # the hooks and fields the mixin uses; at run time it goes before AutoHTTPProtocol (http_protocol)
    from uvicorn.protocols.http.h11_impl import H11Protocol as _UvicornProtocol
else:
    _UvicornProtocol = object


class EdgeLimitsMixin(_UvicornProtocol):
    """Over uvicorn's HTTP protocol (h11 or httptools, the same hooks in both).

    Its access log is left to service/access_log.py. uvicorn has no request-header read timeout: its keep-alive
    timer only runs between requests and any byte received cancels it, so a client trickling a header line a second
    holds a connection forever. Here a timer starts when the connection opens and after each response, and only a
    complete request head (uvicorn then creates a new request cycle) stops it. uvicorn's own `limit_concurrency`
    answers a text/plain 503; this takes the limit over to answer the service's JSON error with Retry-After.

    An answer that starts before the request body has all arrived (413, 408, 503, 401, 404 ...) says
    `Connection: close`, and the connection then closes lingering (service/lingering_close.py), so that the client
    still sending reads the answer instead of a reset. Kept alive instead, uvicorn would read and parse the rest of a
    body of any length before the next request, with no bound.
    """

    header_timeout_s: float
    write_access_log: bool  # settings.access_log (uvicorn's own `access_log` attribute is turned off below)
    metrics: ServiceMetrics
    lingering_connections: LingeringConnections  # the server's, shared by its connections
    _lingering_transport: LingeringTransport  # the connection's transport, set when it is made

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # uvicorn writes its access line on the event loop; service/access_log.py writes the same line off it.
        self.access_log = False
        self.max_connections, self.limit_concurrency = self.limit_concurrency, None
        self.app = self._close_after_early_answer(self._limit_connections(self.app))
        self._header_timer: asyncio.TimerHandle | None = None
        self._cycle_before_headers = None
        self._head_bytes = 0  # received while the request head is incomplete
        self._head_start = b""  # its first KEPT_HEAD_BYTES, for a refusal's metrics and access line
        self._head_started_at = 0.0  # when they began to arrive (time.perf_counter)
        self._answered = False  # a response has completed on this connection: idle now is keep-alive, not a refusal

    def connection_made(self, transport) -> None:
        self._lingering_transport = LingeringTransport(transport, self.loop, self.lingering_connections)
        super().connection_made(self._lingering_transport)
        self._start_header_timer()

    def data_received(self, data: bytes) -> None:
        if self._lingering_transport.lingering:
            self._lingering_transport.discard()  # the answer is out: what the client still sends is dropped
            return
        head_pending = self._header_timer is not None
        if head_pending and len(self._head_start) < KEPT_HEAD_BYTES:  # before parsing: a 400 may come of this read
            if not self._head_start:
                self._head_started_at = time.perf_counter()
            self._head_start += data[:KEPT_HEAD_BYTES - len(self._head_start)]
        super().data_received(data)
        if not head_pending:
            return
        if self.cycle is not self._cycle_before_headers:
            self._stop_header_timer()  # the request head is complete (this chunk may carry body bytes too)
            return
        self._head_bytes += len(data)
        if self._head_bytes > MAX_HEAD_BYTES and not self.transport.is_closing():
            self._refuse_raw(b"431 Request Header Fields Too Large", "header_too_large", HEAD_TOO_LARGE_MESSAGE)

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._answered = True
        # Idle now, unless a pipelined request, already parsed, has just been started.
        if self.cycle.response_complete and not self.transport.is_closing():
            self._start_header_timer()

    def send_400_response(self, msg: str) -> None:
        # uvicorn's answer to bytes that do not parse as HTTP (its own is text/plain, without nosniff).
        self._refuse_raw(b"400 Bad Request", "bad_request", msg)

    def _refuse_raw(self, status_line: bytes, code: str, message: str) -> None:
        """The service's JSON error, written by the server itself (no app), and the connection closed lingering: the
        rest of the request may still be arriving. Behind a response still being sent (bytes that do not parse after
        a pipelined request) nothing is written: the connection just closes.

        A head the app never saw is counted in the request metrics (route "unmatched", the method its request line
        names, if that arrived) and written to the access log here, as _refuse does; a request the app is handling
        (a body that does not parse) is counted and logged by the app's own middleware, with this status (not the
        499 the app's answer to the closed connection would be), and this answer carries its X-Request-ID."""
        self._lingering_transport.linger_on_close = True
        self._stop_header_timer()
        cycle = self.cycle
        if cycle is None or not cycle.response_started or cycle.response_complete:
            status = int(status_line.split()[0])
            app_has_it = cycle is not None and not cycle.response_complete
            id_header = b""
            if app_has_it:  # the app has this request
                scope: Scope = cycle.scope  # type: ignore[assignment]  # uvicorn types its own keys only
                scope[SERVER_ANSWER_SCOPE_KEY] = status
                request_id = scope.setdefault(REQUEST_ID_SCOPE_KEY, request_id_of_headers(scope["headers"]))
                id_header = b"x-request-id: %s\r\n" % request_id.encode()
            else:
                scope = partial_head_scope(self._head_start, self.client)
            body = json.dumps(error_body(code, message, speaks_v2(scope))).encode()  # v2 paths: the protocol's body
            self.transport.write(b"HTTP/1.1 %s\r\ncontent-type: application/json\r\nx-content-type-options: "
                                 b"nosniff\r\n%scontent-length: %d\r\nconnection: close\r\n\r\n%s"
                                 % (status_line, id_header, len(body), body))
            if not app_has_it:  # no request of this head reached the app
                seconds = time.perf_counter() - self._head_started_at if self._head_start else 0.0
                self.metrics.count_request("unmatched", scope["method"], status, seconds)
                if self.write_access_log:
                    ACCESS_LOG.record(scope, status)
        self.transport.close()
        self.metrics.rejected.labels(code).inc()

    def shutdown(self) -> None:
        # uvicorn's graceful shutdown closes idle connections and waits for all to go: a lingering one goes within
        # its bounds (service/lingering_close.py), which timeout_graceful_shutdown leaves room for (uvicorn_config).
        if not self._lingering_transport.lingering:
            super().shutdown()

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_header_timer()
        self._lingering_transport.connection_lost()
        super().connection_lost(exc)

    def _start_header_timer(self) -> None:
        self._stop_header_timer()
        self._cycle_before_headers = self.cycle
        self._head_bytes = 0
        self._head_start = b""
        self._header_timer = self.loop.call_later(self.header_timeout_s, self._on_header_timeout)

    def _stop_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _on_header_timeout(self) -> None:
        self._header_timer = None
        # get_protocol: a WebSocket upgrade hands the connection to another protocol with a complete request head.
        if not self.transport.is_closing() and self.transport.get_protocol() is self:
            # A refusal when a head had begun, or no request ever came; a kept-alive connection idle after its
            # answers (header_timeout_s under timeout_keep_alive_s) is only closed, as the keep-alive timer would.
            if self._head_start or not self._answered:
                self.metrics.rejected.labels("header_timeout").inc()
            self.transport.close()

    def _close_after_early_answer(self, app: ASGIApp) -> ASGIApp:
        async def answer(scope: Scope, receive: Receive, send: Send) -> None:
            if scope["type"] != "http":
                await app(scope, receive, send)
                return

            async def send_closing_when_early(message: Message) -> None:
                if message["type"] == "http.response.start" and self._body_still_arriving(scope):
                    self._lingering_transport.linger_on_close = True
                    message = closing_connection(message)
                await send(message)

            await app(scope, receive, send_closing_when_early)

        return answer

    def _body_still_arriving(self, scope: Scope) -> bool:
        # The protocol's current cycle is this request's, unless its parser has moved on to a pipelined request,
        # which it does only once this request's body is complete. Both of uvicorn's protocols clear more_body when
        # the body's last byte has been parsed (read by the app or not).
        cycle = self.cycle
        return cycle is not None and cycle.scope is scope and cycle.more_body

    def _limit_connections(self, app: ASGIApp) -> ASGIApp:
        async def limited(scope: Scope, receive: Receive, send: Send) -> None:
            if scope["type"] == "http" and head_bytes(scope) > MAX_HEAD_BYTES:
                # A head that arrived whole in one read, which data_received never counted as incomplete.
                await self._refuse(scope, send, 431, "header_too_large", HEAD_TOO_LARGE_MESSAGE,
                                   [(b"connection", b"close")])
                return
            # uvicorn's check, counted with this request's own connection and task already in the sets. Probes and
            # scrapes always pass: a liveness probe failing under load would restart a busy but healthy server.
            if self.max_connections is None or scope.get("path") in PROBE_PATHS or (
                    len(self.connections) <= self.max_connections and len(self.tasks) <= self.max_connections):
                await app(scope, receive, send)
                return
            await self._refuse(scope, send, 503, "too_many_connections", f"the server is at its limit of "
                               f"{self.max_connections} connections; retry shortly",
                               [(b"retry-after", b"1"), (b"connection", b"close")])

        return limited

    async def _refuse(self, scope: Scope, send: Send, status: int, code: str, message: str,
                      headers: list[tuple[bytes, bytes]]) -> None:
        started = time.perf_counter()
        self.metrics.rejected.labels(code).inc()
        await send_error(scope, send, status, code, message, [*headers, NOSNIFF])
        if scope["type"] == "http":
            # Refused before routing (outside the request metrics' middleware): counted here, under no route.
            self.metrics.count_request("unmatched", scope["method"], status, time.perf_counter() - started)
            if self.write_access_log:
                ACCESS_LOG.record(scope, status)


def head_bytes(scope: Scope) -> int:
    """The request line and headers' size as sent, give or take the spaces: method, target, version, each header."""
    target = len(scope.get("raw_path") or b"") + len(scope.get("query_string") or b"") + 1
    return len(scope["method"]) + target + 12 + sum(len(name) + len(value) + 4 for name, value in scope["headers"])


def partial_head_scope(head_start: bytes, client: tuple[str, int] | None) -> Scope:
    """A head refused before it was complete, as a scope for the request metrics and the access log, from its first
    bytes: the method and target its request line names, "-" for what did not arrive (or is not HTTP); a target cut
    short (the request line did not end within them) ends in "...", an unknown version is "-"."""
    line = REQUEST_LINE.match(head_start)
    method, target, version = line.groups() if line is not None else (b"-", b"-", None)
    if line is not None and version is None:
        target += b"..."
    path, _, query = target.decode("latin-1").partition("?")
    return {"type": "http", "method": method.decode("latin-1"), "path": urllib.parse.unquote(path),
            "query_string": urllib.parse.quote(query, safe="=&+%/:@!$'()*,;?").encode(),
            "http_version": version.decode() if version is not None else "-", "client": client, "headers": []}


def closing_connection(start: Message) -> Message:
    """An `http.response.start` message that says `Connection: close` (uvicorn then closes after the answer)."""
    headers = list(start.get("headers", []))
    if not any(name.lower() == b"connection" and b"close" in value.lower() for name, value in headers):
        headers.append((b"connection", b"close"))
    return {**start, "headers": headers}


def http_protocol(header_timeout_s: float, metrics: ServiceMetrics, max_connections: int | None = None,
                  base: type = AutoHTTPProtocol, *, access_log: bool = True) -> type:
    """The protocol class uvicorn would pick (`http="auto"`: httptools, or h11 where httptools is not installed), or
    `base`, with the edge limits mixed in; one class per server, which its connections share (what lingers).
    `access_log`: whether its own refusals (431, 503 at the connection limit) write an access line."""
    return type(f"Edge{base.__name__}", (EdgeLimitsMixin, base),
                {"header_timeout_s": header_timeout_s, "write_access_log": access_log, "metrics": metrics,
                 "lingering_connections": LingeringConnections(max_connections)})


def log_config(log_level: str) -> dict:
    """uvicorn's logging, plus the project's own loggers (convnext.*: engine choice, reloads, rebuilds) beside it; an
    access line ends with the request's id (service/access_log.py)."""
    config = copy.deepcopy(LOGGING_CONFIG)
    access = config["formatters"]["access"]
    access["()"] = f"{AccessLineFormatter.__module__}.{AccessLineFormatter.__qualname__}"
    access["fmt"] += " %(request_id)s"
    config["loggers"]["convnext"] = {"handlers": ["default"], "level": log_level.upper()}
    return config


class Server(uvicorn.Server):
    """uvicorn's server, listening on host "::" for IPv4 too (service/listen_socket.py). When its shutdown begins
    (SIGTERM), the app's gRPC server stops taking calls too (service.app.begin_drain); once it has shut down, the
    access lines still queued are written before uvicorn re-raises a caught SIGTERM (which ends the process without
    running atexit)."""

    async def startup(self, sockets=None) -> None:
        if sockets is not None or not is_ipv6_wildcard(self.config.host):
            await super().startup(sockets=sockets)
            return
        # uvicorn's own bind would be IPv6 only; it serves a socket bound here instead, as one a process manager hands
        # it. Bound before the lifespan loads the model: a port taken since check_ports_free fails the start at once.
        try:
            listener = bound_socket(self.config.host, self.config.port)
        except OSError as err:
            UVICORN_LOG.error(err)  # as uvicorn ends a start whose bind failed
            sys.exit(STARTUP_FAILURE)
        try:
            await super().startup(sockets=[listener])
        except BaseException:
            listener.close()
            raise
        # uvicorn names the address only for a socket it bound itself.
        UVICORN_LOG.info("Uvicorn running on http://[%s]:%d (Press CTRL+C to quit)", self.config.host,
                         listener.getsockname()[1])

    async def shutdown(self, sockets=None) -> None:
        if isinstance(self.config.app, FastAPI):
            begin_drain(self.config.app)
        try:
            await super().shutdown(sockets=sockets)
        finally:
            ACCESS_LOG.flush()


def check_ports_free(settings: Settings) -> None:
    """OSError naming the setting to change when the HTTP or gRPC port cannot be bound (taken, or on an address or
    family this host lacks: listen_socket.bind_refusal). Checked before the model loads: the gRPC server and uvicorn
    (but on "::", Server.startup) only bind after it, which can take minutes (a TensorRT build)."""
    for setting, port, protocol in (("port", settings.port, "HTTP"), ("grpc-port", settings.grpc_port, "gRPC")):
        if port == 0:  # HTTP: any free port; gRPC: off
            continue
        try:
            bound_socket(settings.host, port).close()  # as the server binds: on "::", IPv4's port must be free too
        except OSError as err:
            raise OSError(bind_refusal(err, protocol, settings.host, port, f"--{setting}")
                          + ("; 0 turns gRPC off" if protocol == "gRPC" else "")) from None


def graceful_shutdown_s(settings: Settings) -> int:
    """uvicorn's graceful shutdown: the requests in flight get their request timeout + 5 s, plus the longest
    lingering close (one that starts as the shutdown ends still goes within it). The lifespan's batcher drain
    (request timeout again) follows; deploy's stop grace periods outlast both (tests/deploy)."""
    return int(settings.request_timeout_ms / 1000) + 5 + math.ceil(LINGERING_TIME_S)


def uvicorn_config(app: FastAPI, settings: Settings, log_level: str = "info") -> uvicorn.Config:
    """The one server set-up, used by `python -m service` and by the tests' live server."""
    config = uvicorn.Config(
        app, host=settings.host, port=settings.port, log_level=log_level, log_config=log_config(log_level),
        http=http_protocol(settings.header_timeout_s, app.state.metrics, settings.max_connections,
                           access_log=settings.access_log),
        limit_concurrency=settings.max_connections, backlog=settings.backlog,
        # h11 (where httptools is not installed) refuses a head still incomplete past its own 16 KiB with a bare 400;
        # past the service's limit by one socket read, so EdgeLimitsMixin answers 431 after that read, as on httptools.
        h11_max_incomplete_event_size=MAX_HEAD_BYTES + MAX_SOCKET_READ_BYTES,
        # uvicorn annotates int but hands it to loop.call_later, which takes fractions of a second too.
        timeout_keep_alive=settings.timeout_keep_alive_s,  # type: ignore[arg-type]
        # uvicorn stops accepting on SIGTERM, waits for in-flight requests, then runs the lifespan shutdown,
        # which drains the batcher.
        timeout_graceful_shutdown=graceful_shutdown_s(settings),
    )
    return config
