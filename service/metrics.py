"""Prometheus metrics, one CollectorRegistry per app (the names are the Grafana dashboard's contract)."""
from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator, Mapping

from fastapi.routing import iter_route_contexts
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector
from starlette.routing import BaseRoute, Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.access_log import ACCESS_LOG, AccessLog
from service.request_ids import REQUEST_ID_HEADER, REQUEST_ID_SCOPE_KEY, request_id_of_headers

# From 1 ms (a GPU batch) to 30 s (a CPU batch of 32 queued behind others), neighbours 1.33-2x apart (mostly 1.5x):
# a quantile interpolated in a bucket is that close anywhere in the range (the old 5 ms floor put a whole GPU batch
# in one bucket, and its 1 -> 2.5 -> 5 s steps blurred the CPU percentiles).
LATENCY_BUCKETS = (0.001, 0.0015, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2,
                   0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 7.5, 10.0, 15.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)
ENGINE_CALL_OUTCOMES = ("ok", "failed", "timeout")  # convnext_inference_seconds{outcome}
# /metrics is open and exempt from max_connections (Prometheus must reach it under load), and a render takes ~4 ms of
# the event loop: renders start at most this often, so a flood of scrapes costs the loop <= ~10% instead of all of it.
METRICS_RENDER_INTERVAL_S = 0.05
HTTP_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS", "PATCH", "TRACE", "CONNECT"})


def status_class(status: int) -> str:
    """200 -> "2xx": latency is labelled by class, so refusals (fast 503s, 4xx) never pull the served requests'
    percentiles down, with a handful of label values."""
    return f"{status // 100}xx"


def method_label(method: str) -> str:
    """The request method as a label: the standard ones as they are, anything else "other" (h11 passes any token)."""
    return method if method in HTTP_METHODS else "other"


class AccessLogDropped(Collector):
    """convnext_access_log_dropped_total: the access log's count, read at each scrape (it lives in the process's
    AccessLog, which the writer thread and the event loop count in)."""

    def __init__(self, access_log: AccessLog):
        self.access_log = access_log

    def collect(self) -> Iterator[Metric]:
        yield CounterMetricFamily("convnext_access_log_dropped", "access log lines not written (the queue of lines "
                                  "waiting for the log's output was full, or a line could not be formatted)",
                                  value=self.access_log.dropped)


class ServiceMetrics:
    def __init__(self, access_log: AccessLog = ACCESS_LOG) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("convnext_requests_total", "HTTP requests", ["route", "method", "status"], registry=r)
        self.request_duration = Histogram("convnext_request_duration_seconds", "HTTP request latency, to the last "
                                          "body byte, by status class (2xx: answered)", ["route", "status_class"],
                                          buckets=LATENCY_BUCKETS, registry=r)
        self.queue_wait = Histogram("convnext_queue_wait_seconds", "time an image waits in the batch queue, until "
                                    "its batch starts or its request stops waiting (deadline, client gone)",
                                    buckets=LATENCY_BUCKETS, registry=r)
        self.preprocess = Histogram("convnext_preprocess_seconds", "decode + transform time per image decoded, the "
                                    "wait for decode memory left out", buckets=LATENCY_BUCKETS, registry=r)
        self.decode_memory_wait = Histogram("convnext_decode_memory_wait_seconds", "time an image waits for its "
                                            "decode memory (decode_memory_mb), 0 when it fits at once; waits that "
                                            "end at the deadline or when the client leaves included",
                                            buckets=LATENCY_BUCKETS, registry=r)
        self.inference = Histogram("convnext_inference_seconds", "engine call per batch, from the hand-off to the "
                                   "engine thread to its result, by outcome (ok, failed: the engine raised, timeout: "
                                   "given up at engine_timeout_ms)", ["outcome"], buckets=LATENCY_BUCKETS, registry=r)
        for outcome in ENGINE_CALL_OUTCOMES:  # each series exists (at 0) before its first call: rates read 0, not empty
            self.inference.labels(outcome)
        self.batch_size = Histogram("convnext_batch_size", "images per engine call, whatever its outcome",
                                    buckets=BATCH_BUCKETS, registry=r)
        self.images = Counter("convnext_images_total", "images answered with a classification", ["model"], registry=r)
        self.queue_depth = Gauge("convnext_queue_depth", "images waiting for the engine: queued, in the batch being "
                                 "gathered, or in one waiting for an engine; not those whose client has left",
                                 registry=r)
        self.decode_memory = Gauge("convnext_decode_memory_bytes", "memory reserved by images being decoded (of "
                                   "decode_memory_mb)", registry=r)
        self.inflight = Gauge("convnext_inflight_requests", "HTTP requests being handled, the scrape reading it "
                              "included", registry=r)
        self.grpc_inflight = Gauge("convnext_grpc_inflight_calls", "gRPC calls being handled (max_connections bounds "
                                   "them, ServerLive and ServerReady aside)", registry=r)
        self.model_info = Gauge("convnext_model_info", "the served model (value 1)",
                                ["name", "version", "engine", "precision"], registry=r)
        self.grpc_requests = Counter("convnext_grpc_requests_total", "gRPC calls (Open Inference Protocol)",
                                     ["method", "code"], registry=r)
        self.grpc_request_duration = Histogram("convnext_grpc_request_duration_seconds", "gRPC call latency, by "
                                               "status code (OK: answered)", ["method", "code"],
                                               buckets=LATENCY_BUCKETS, registry=r)
        self.rejected = Counter("convnext_rejected_total", "requests not answered 200 (HTTP and gRPC), by the error "
                                "code answered: refusals, deadlines, clients gone (client_disconnected, "
                                "client_deadline), failures; header_timeout counts connections closed before a "
                                "request head arrived", ["reason"], registry=r)
        r.register(AccessLogDropped(access_log))

        self.renders = 0
        self._next_render: asyncio.Future[bytes] | None = None  # scheduled, not started: later scrapes join it
        self._last_render_started = float("-inf")

    async def rendered(self) -> bytes:
        """The registry in the text format, from a render that started after this call (never a stale one); scrapes
        arriving while one waits its turn share it, and renders start at least METRICS_RENDER_INTERVAL_S apart."""
        if self._next_render is None or self._next_render.get_loop() is not asyncio.get_running_loop():
            self._next_render = asyncio.ensure_future(self._render_in_turn())
            self._next_render.add_done_callback(lambda done: done.cancelled() or done.exception())  # if all left
        return await asyncio.shield(self._next_render)  # a scrape that leaves does not cancel the others' render

    async def _render_in_turn(self) -> bytes:
        loop = asyncio.get_running_loop()
        wait_s = self._last_render_started + METRICS_RENDER_INTERVAL_S - loop.time()
        if wait_s > 0:
            await asyncio.sleep(wait_s)
        self._next_render = None  # from here on, a new scrape needs a render that starts after it
        self._last_render_started = loop.time()
        self.renders += 1
        return generate_latest(self.registry)

    def count_images(self, counts: Mapping[str, int]) -> None:
        """convnext_images_total: images answered with a classification, by the model that ran them."""
        for model_name, count in counts.items():
            self.images.labels(model_name).inc(count)

    def count_request(self, route: str, method: str, status: int, seconds: float) -> None:
        """One HTTP request answered: convnext_requests_total and its latency by status class."""
        self.requests.labels(route, method_label(method), str(status)).inc()
        self.request_duration.labels(route, status_class(status)).observe(seconds)


# Where the server leaves the status it answered itself, outside the app, to a request the app has (service/server.py:
# a body that does not parse, or bytes that are not HTTP after a whole request): that is the status counted and
# logged, not the app's own answer to the closed connection, and the app's refusal of it is not counted again.
SERVER_ANSWER_SCOPE_KEY = "convnext.server_answered"
# Where an HTTP request's classified images (model name -> count) wait to be counted in convnext_images_total: with
# the request's answer, when that is the app's 200 (not the server's own answer, which the app's 200 never follows).
CLASSIFIED_SCOPE_KEY = "convnext.classified"


class RequestMetricsMiddleware:
    """Counts HTTP requests by route, method and status, times them to the last body byte, tracks in-flight ones;
    queues each for the access log; and gives each its id (service/request_ids.py), kept in the scope and sent back
    as `X-Request-ID` on whatever answers it inside (routes, handlers, the edge's 401/403/CORS, the admission gate,
    the body budget). Here rather than in a layer of its own: each layer is paid by every request.

    The route label is the matched route's path; for a request answered before routing (a 401 from the API key check,
    a 403 from the /admin Host check, a CORS preflight, the admission gate's 503) the path of the route its path names,
    as the router would have picked it: a dashboard of /classify sees its refusals too. "unmatched": a path that is no
    route (the server's own refusals, outside the app, count there too: service/server.py)."""

    def __init__(self, app: ASGIApp, metrics: ServiceMetrics, access_log: bool = True,
                 plain_routes: frozenset[str] = frozenset()):
        self.app, self.metrics, self.access_log = app, metrics, access_log
        self.plain_routes = plain_routes  # paths of Starlette routes, which set no scope["route"] (/openapi.json)
        self._routes: list[tuple[BaseRoute, str]] | None = None  # the app's, once a request is answered unrouted

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500  # an exception that escapes the app is answered 500 by Starlette's outermost handler
        # That 500's id too; the server's own 400 may have given the request its id already (service/server.py).
        request_id = scope.get(REQUEST_ID_SCOPE_KEY) or request_id_of_headers(scope["headers"])
        scope[REQUEST_ID_SCOPE_KEY] = request_id
        id_header = (REQUEST_ID_HEADER, request_id.encode())

        async def send_and_note_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message = {**message, "headers": [*message.get("headers", ()), id_header]}
            await send(message)

        self.metrics.inflight.inc()
        try:
            await self.app(scope, receive, send_and_note_status)
        finally:
            self.metrics.inflight.dec()
            status = scope.get(SERVER_ANSWER_SCOPE_KEY, status)
            if status == 200 and CLASSIFIED_SCOPE_KEY in scope:
                self.metrics.count_images(scope[CLASSIFIED_SCOPE_KEY])
            self.metrics.count_request(self._route_label(scope), scope["method"], status,
                                       time.perf_counter() - started)
            if self.access_log:
                ACCESS_LOG.record(scope, status)

    def _route_label(self, scope: Scope) -> str:
        route = scope.get("route")  # set by the router on the same scope dict when a route matched
        if route is not None:
            return route.path
        if scope.get("route_path"):  # set by a refusal before routing that knows its route (the admission gate)
            return scope["route_path"]
        if scope["path"] in self.plain_routes:
            return scope["path"]
        if "router" in scope:  # the router ran and matched nothing (404)
            return "unmatched"
        return self._route_named(scope)

    def _route_named(self, scope: Scope) -> str:
        """The path of the app's route the router would pick for this request: one of its path and method, else one
        of its path alone (a 405 would name it); "unmatched" when none."""
        if self._routes is None:  # built on first use: every route is in by then
            contexts = iter_route_contexts(scope["app"].routes)
            self._routes = [(context.original_route, path) for context in contexts
                            if isinstance(path := getattr(context.original_route, "path", None), str)]
        other_method = "unmatched"
        for route, path in self._routes:
            match, _ = route.matches(scope)
            if match is Match.FULL:
                return path
            if match is Match.PARTIAL and other_method == "unmatched":
                other_method = path
        return other_method
