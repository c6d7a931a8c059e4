"""The service's HTTP edge, as pure ASGI middleware: optional API-key auth (deny by default), opt-in CORS, and
`X-Content-Type-Options: nosniff` on every answer."""
from __future__ import annotations

from fastapi import FastAPI
from starlette.middleware.cors import CORSMiddleware
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.api_keys import admin_key, key_accepted, presented_keys
from service.errors import is_under, routed_path, send_error
from service.metrics import ServiceMetrics
from service.pages import DOCS_PUBLIC_PATHS
from service.settings import Settings

# Open without a key: probes, the metrics scrape (meant for the private network, like the probes), the web page,
# the model list it shows, and the API docs with the files they load, each by its exact path (service/pages.py).
# Every other path, including any route added later, needs the key.
PUBLIC_PATHS = frozenset({"/", "/healthz", "/readyz", "/metrics", "/models", "/openapi.json", "/v2/health/live",
                          "/v2/health/ready"}) | DOCS_PUBLIC_PATHS
NOSNIFF_HEADERS = {"X-Content-Type-Options": "nosniff"}
NOSNIFF = (b"x-content-type-options", b"nosniff")
ADMIN_PREFIX = "/admin"


def required_key(settings: Settings, path: str) -> str | None:
    """The key a request to `path` must carry (None: open): admin_api_key on /admin when set, else api_key; the
    open paths never. The middleware and the OpenAPI document both follow this."""
    if path in PUBLIC_PATHS:
        return None
    if is_under(path, ADMIN_PREFIX):
        return admin_key(settings)
    return settings.api_key.get_secret_value() if settings.api_key is not None else None


class ApiKeyMiddleware:
    """401 JSON for HTTP requests to non-public paths without the right key; the key is never logged or echoed."""

    def __init__(self, app: ASGIApp, settings: Settings, metrics: ServiceMetrics):
        self.app, self.settings, self.metrics = app, settings, metrics

    def _key_for(self, scope: Scope) -> bytes | None:
        # OPTIONS: a CORS preflight carries no credentials; CORSMiddleware (outside) or a 405 answers it.
        if scope["type"] != "http" or scope["method"] == "OPTIONS":
            return None
        key = required_key(self.settings, routed_path(scope))
        return key.encode() if key is not None else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        key = self._key_for(scope)
        if key is None or key_accepted(scope["headers"], key):
            await self.app(scope, receive, send)
            return
        self.metrics.rejected.labels("unauthorized").inc()
        reason = "a wrong API key" if presented_keys(scope["headers"]) else "no API key"
        await send_error(scope, send, 401, "unauthorized", f"the request carries {reason}; send "
                         "`Authorization: Bearer <key>` or `X-API-Key: <key>`", [(b"www-authenticate", b"Bearer")])


class NoSniffMiddleware:
    """`X-Content-Type-Options: nosniff` on every HTTP answer: a browser takes each body as its declared type (an
    error echoing a client's text is never run as HTML or script)."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_nosniff(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", ()), NOSNIFF]}
            await send(message)

        await self.app(scope, receive, send_with_nosniff)


# What a page on an allowed origin may send: the key, the body's type and encoding (gzip), and the v2 binary tensor
# extension's header; and what it may read of an answer: that header (to split a binary answer) and Retry-After.
CORS_REQUEST_HEADERS = ["Authorization", "X-API-Key", "Content-Type", "Content-Encoding",
                        "Inference-Header-Content-Length"]
CORS_EXPOSED_HEADERS = ["Inference-Header-Content-Length", "Retry-After"]


def install_edge(app: FastAPI, settings: Settings, metrics: ServiceMetrics) -> None:
    """Auth when `api_key` or `admin_api_key` is set, then CORS (so preflights and 401s get its headers) when origins
    are, then nosniff (outermost of the three: on 401s and CORS answers too).

    The OpenAPI document declares the key and its 401s (service/openapi.py).
    """
    if settings.api_key is not None or settings.admin_api_key is not None:
        app.add_middleware(ApiKeyMiddleware, settings=settings, metrics=metrics)
    if settings.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_origins, allow_methods=["GET", "POST"],
                           allow_headers=CORS_REQUEST_HEADERS, expose_headers=CORS_EXPOSED_HEADERS)
    app.add_middleware(NoSniffMiddleware)
