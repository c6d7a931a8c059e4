"""Prometheus metrics, one CollectorRegistry per app (the names are the Grafana dashboard's contract)."""
from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.access_log import ACCESS_LOG

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)


class ServiceMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("convnext_requests_total", "HTTP requests", ["route", "method", "status"], registry=r)
        self.request_duration = Histogram("convnext_request_duration_seconds", "HTTP request latency", ["route"],
                                          buckets=LATENCY_BUCKETS, registry=r)
        self.queue_wait = Histogram("convnext_queue_wait_seconds", "time an image waits in the batch queue",
                                    buckets=LATENCY_BUCKETS, registry=r)
        self.preprocess = Histogram("convnext_preprocess_seconds", "decode + transform time per image",
                                    buckets=LATENCY_BUCKETS, registry=r)
        self.inference = Histogram("convnext_inference_seconds", "engine time per batch",
                                   buckets=LATENCY_BUCKETS, registry=r)
        self.batch_size = Histogram("convnext_batch_size", "images per engine batch", buckets=BATCH_BUCKETS, registry=r)
        self.images = Counter("convnext_images_total", "images classified", ["model"], registry=r)
        self.queue_depth = Gauge("convnext_queue_depth", "images waiting in the batch queue", registry=r)
        self.inflight = Gauge("convnext_inflight_requests", "HTTP requests being handled", registry=r)
        self.model_info = Gauge("convnext_model_info", "the served model (value 1)",
                                ["name", "version", "engine", "precision"], registry=r)
        self.grpc_requests = Counter("convnext_grpc_requests_total", "gRPC calls (Open Inference Protocol)",
                                     ["method", "code"], registry=r)
        self.grpc_request_duration = Histogram("convnext_grpc_request_duration_seconds", "gRPC call latency",
                                               ["method"], buckets=LATENCY_BUCKETS, registry=r)
        self.rejected = Counter("convnext_rejected_total", "requests refused, by reason", ["reason"], registry=r)


class RequestMetricsMiddleware:
    """Counts HTTP requests by route, method and status, times them to the last body byte, tracks in-flight ones;
    and queues each for the access log."""

    def __init__(self, app: ASGIApp, metrics: ServiceMetrics, access_log: bool = True):
        self.app, self.metrics, self.access_log = app, metrics, access_log

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500  # an exception that escapes the app is answered 500 by Starlette's outermost handler

        async def send_and_note_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        self.metrics.inflight.inc()
        try:
            await self.app(scope, receive, send_and_note_status)
        finally:
            self.metrics.inflight.dec()
            route = scope.get("route")  # set by the router on the same scope dict when a route matched
            path = route.path if route is not None else scope.get("route_path", "unmatched")
            self.metrics.requests.labels(path, scope["method"], str(status)).inc()
            self.metrics.request_duration.labels(path).observe(time.perf_counter() - started)
            if self.access_log:
                ACCESS_LOG.record(scope, status)
