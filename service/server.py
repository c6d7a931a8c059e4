"""The uvicorn server set-up: a header read timeout (against slowloris), JSON 503 beyond max_connections."""
from __future__ import annotations

import asyncio
import copy
import json
import socket
import time
from typing import TYPE_CHECKING

import uvicorn
from fastapi import FastAPI
from starlette.types import ASGIApp, Receive, Scope, Send
from uvicorn.config import LOGGING_CONFIG
from uvicorn.protocols.http.auto import AutoHTTPProtocol

from service.access_log import ACCESS_LOG
from service.app import begin_drain
from service.errors import error_body, send_error
from service.metrics import ServiceMetrics
from service.settings import Settings

# Answered beyond max_connections too: orchestrators' health checks and Prometheus, cheap and needed most under load.
PROBE_PATHS = frozenset({"/healthz", "/readyz", "/metrics", "/v2/health/live", "/v2/health/ready"})
# A request line + headers beyond this is refused (431): uvicorn's httptools protocol appends the URL piece by piece,
# so a multi-MB URL sent in small segments costs the event loop quadratic time before any route or key check.
MAX_HEAD_BYTES = 64 * 1024
HEAD_TOO_LARGE = json.dumps(error_body("header_too_large", f"the request line and headers are over {MAX_HEAD_BYTES} "
                                       "bytes")).encode()

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
    """

    header_timeout_s: float
    metrics: ServiceMetrics

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # uvicorn writes its access line on the event loop; service/access_log.py writes the same line off it.
        self.access_log = False
        self.max_connections, self.limit_concurrency = self.limit_concurrency, None
        self.app = self._limit_connections(self.app)
        self._header_timer: asyncio.TimerHandle | None = None
        self._cycle_before_headers = None
        self._head_bytes = 0  # received while the request head is incomplete

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._start_header_timer()

    def data_received(self, data: bytes) -> None:
        head_pending = self._header_timer is not None
        super().data_received(data)
        if not head_pending:
            return
        if self.cycle is not self._cycle_before_headers:
            self._stop_header_timer()  # the request head is complete (this chunk may carry body bytes too)
            return
        self._head_bytes += len(data)
        if self._head_bytes > MAX_HEAD_BYTES and not self.transport.is_closing():
            self.metrics.rejected.labels("header_too_large").inc()
            self.transport.write(b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-type: application/json\r\n"
                                 b"content-length: %d\r\nconnection: close\r\n\r\n%s" % (len(HEAD_TOO_LARGE),
                                                                                     HEAD_TOO_LARGE))
            self._stop_header_timer()
            self.transport.close()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        # Idle now, unless a pipelined request, already parsed, has just been started.
        if self.cycle.response_complete and not self.transport.is_closing():
            self._start_header_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_header_timer()
        super().connection_lost(exc)

    def _start_header_timer(self) -> None:
        self._stop_header_timer()
        self._cycle_before_headers = self.cycle
        self._head_bytes = 0
        self._header_timer = self.loop.call_later(self.header_timeout_s, self._on_header_timeout)

    def _stop_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _on_header_timeout(self) -> None:
        self._header_timer = None
        # get_protocol: a WebSocket upgrade hands the connection to another protocol with a complete request head.
        if not self.transport.is_closing() and self.transport.get_protocol() is self:
            self.metrics.rejected.labels("header_timeout").inc()
            self.transport.close()

    def _limit_connections(self, app: ASGIApp) -> ASGIApp:
        async def limited(scope: Scope, receive: Receive, send: Send) -> None:
            # uvicorn's check, counted with this request's own connection and task already in the sets. Probes and
            # scrapes always pass: a liveness probe failing under load would restart a busy but healthy server.
            if self.max_connections is None or scope.get("path") in PROBE_PATHS or (
                    len(self.connections) <= self.max_connections and len(self.tasks) <= self.max_connections):
                await app(scope, receive, send)
                return
            started = time.perf_counter()
            self.metrics.rejected.labels("too_many_connections").inc()
            await send_error(scope, send, 503, "too_many_connections", f"the server is at its limit of "
                             f"{self.max_connections} connections; retry shortly",
                             [(b"retry-after", b"1"), (b"connection", b"close")])
            if scope["type"] == "http":
                # Refused before routing (outside the request metrics' middleware): counted here, under no route.
                self.metrics.count_request("unmatched", scope["method"], 503, time.perf_counter() - started)
                ACCESS_LOG.record(scope, 503)

        return limited


def http_protocol(header_timeout_s: float, metrics: ServiceMetrics) -> type:
    """The protocol class uvicorn would pick (`http="auto"`), with the edge limits mixed in."""
    return type(f"Edge{AutoHTTPProtocol.__name__}", (EdgeLimitsMixin, AutoHTTPProtocol),
                {"header_timeout_s": header_timeout_s, "metrics": metrics})


def log_config(log_level: str) -> dict:
    """uvicorn's logging, plus the project's own loggers (convnext.*: engine choice, reloads, rebuilds) beside it."""
    config = copy.deepcopy(LOGGING_CONFIG)
    config["loggers"]["convnext"] = {"handlers": ["default"], "level": log_level.upper()}
    return config


class Server(uvicorn.Server):
    """uvicorn's server. When its shutdown begins (SIGTERM), the app's gRPC server stops taking calls too
    (service.app.begin_drain); once it has shut down, the access lines still queued are written before uvicorn
    re-raises a caught SIGTERM (which ends the process without running atexit)."""

    async def shutdown(self, sockets=None) -> None:
        if isinstance(self.config.app, FastAPI):
            begin_drain(self.config.app)
        try:
            await super().shutdown(sockets=sockets)
        finally:
            ACCESS_LOG.flush()


def check_ports_free(settings: Settings) -> None:
    """OSError naming the setting to change when the HTTP or gRPC port is already taken. Checked before the model
    loads: uvicorn and the gRPC server only bind after it, which can take minutes (a TensorRT build)."""
    for setting, port, protocol in (("port", settings.port, "HTTP"), ("grpc-port", settings.grpc_port, "gRPC")):
        if port == 0:  # HTTP: any free port; gRPC: off
            continue
        family, kind, proto, _, address = socket.getaddrinfo(settings.host, port, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)[0]
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds: TIME_WAIT is no owner
            try:
                probe.bind(address)
            except OSError as err:
                raise OSError(f"the {protocol} port {settings.host}:{port} is taken ({err.strerror}): stop "
                              f"the server using it, or pass --{setting} with a free port"
                              + ("; 0 turns gRPC off" if protocol == "gRPC" else "")) from None


def uvicorn_config(app: FastAPI, settings: Settings, log_level: str = "info") -> uvicorn.Config:
    """The one server set-up, used by `python -m service` and by the tests' live server."""
    config = uvicorn.Config(
        app, host=settings.host, port=settings.port, log_level=log_level, log_config=log_config(log_level),
        http=http_protocol(settings.header_timeout_s, app.state.metrics),
        limit_concurrency=settings.max_connections, backlog=settings.backlog,
        # uvicorn annotates int but hands it to loop.call_later, which takes fractions of a second too.
        timeout_keep_alive=settings.timeout_keep_alive_s,  # type: ignore[arg-type]
        # uvicorn stops accepting on SIGTERM, waits for in-flight requests, then runs the lifespan shutdown,
        # which drains the batcher.
        timeout_graceful_shutdown=int(settings.request_timeout_ms / 1000) + 5,
    )
    return config
