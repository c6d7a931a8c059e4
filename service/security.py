"""The service's HTTP edge: optional API-key auth (deny by default) and opt-in CORS, as pure ASGI middleware."""
from __future__ import annotations

import hmac

from fastapi import FastAPI
from starlette.middleware.cors import CORSMiddleware
from starlette.types import ASGIApp, Receive, Scope, Send

from service.errors import send_error
from service.metrics import ServiceMetrics
from service.settings import Settings

# Open without a key: probes, the metrics scrape (meant for the private network, like the probes), the web page,
# the model list it shows, and the API docs. Every other path, including any route added later, needs the key.
PUBLIC_PATHS = frozenset({"/", "/healthz", "/readyz", "/metrics", "/models", "/docs", "/docs/oauth2-redirect",
                          "/redoc", "/openapi.json", "/v2/health/live", "/v2/health/ready"})
SCHEME_NAMES = ("bearer", "api_key")


def presented_key(headers: list[tuple[bytes, bytes]]) -> bytes | None:
    """The key from `Authorization: Bearer <key>` or `X-API-Key: <key>`; None when neither header is there."""
    for name, value in headers:
        if name == b"x-api-key":
            return value.strip()
        if name == b"authorization":
            scheme, _, token = value.partition(b" ")
            if scheme.lower() == b"bearer":
                return token.strip()
    return None


class ApiKeyMiddleware:
    """401 JSON for HTTP requests to non-public paths without the right key; the key is never logged or echoed."""

    def __init__(self, app: ASGIApp, api_key: str, metrics: ServiceMetrics):
        self.app, self.metrics = app, metrics
        self._key = api_key.encode()

    @staticmethod
    def _is_public(scope: Scope) -> bool:
        path = scope["path"].removeprefix(scope.get("root_path", ""))  # as the routes see it, behind a proxy prefix
        # OPTIONS: a CORS preflight carries no credentials; CORSMiddleware (outside) or a 405 answers it.
        return path in PUBLIC_PATHS or scope["method"] == "OPTIONS"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or self._is_public(scope):
            await self.app(scope, receive, send)
            return
        key = presented_key(scope["headers"])
        if key is not None and hmac.compare_digest(key, self._key):
            await self.app(scope, receive, send)
            return
        self.metrics.rejected.labels("unauthorized").inc()
        reason = "no API key" if key is None else "a wrong API key"
        await send_error(send, 401, "unauthorized", f"the request carries {reason}; send `Authorization: Bearer "
                         "<key>` or `X-API-Key: <key>`", [(b"www-authenticate", b"Bearer")])


def add_security_schemes(app: FastAPI) -> None:
    """Show the two ways to send the key in the OpenAPI schema (and the docs' Authorize button)."""
    build_schema = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is None:
            schema = build_schema()
            schema.setdefault("components", {})["securitySchemes"] = {
                "bearer": {"type": "http", "scheme": "bearer"},
                "api_key": {"type": "apiKey", "in": "header", "name": "X-API-Key"},
            }
            for path, operations in schema.get("paths", {}).items():
                if path not in PUBLIC_PATHS:
                    for operation in operations.values():
                        operation["security"] = [{name: []} for name in SCHEME_NAMES]
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi


def install_edge(app: FastAPI, settings: Settings, metrics: ServiceMetrics) -> None:
    """Auth when `api_key` is set, then CORS (outermost, so preflights and 401s get its headers) when origins are."""
    if settings.api_key is not None:
        app.add_middleware(ApiKeyMiddleware, api_key=settings.api_key.get_secret_value(), metrics=metrics)
        add_security_schemes(app)
    if settings.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_origins, allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "X-API-Key", "Content-Type"])
