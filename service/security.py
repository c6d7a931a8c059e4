"""The service's HTTP edge, as pure ASGI middleware: optional API-key auth (deny by default), without a key a Host
and Origin check on /admin (against DNS rebinding), opt-in CORS, and `X-Content-Type-Options: nosniff` on every
answer."""
from __future__ import annotations

import ipaddress
import re

from fastapi import FastAPI
from starlette.middleware.cors import CORSMiddleware
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.api_keys import admin_key, key_accepted, presented_keys
from service.errors import is_under, routed_path, send_error, shown
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
# A Host header: "[v6 address]" or a name or v4 address, then an optional port.
HOST_HEADER = re.compile(r"(?:\[(?P<address>[^\]]*)\]|(?P<name>[^:\[\]]*))(?::[0-9]*)?")


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


def host_allowed(host: str, allowed_names: frozenset[str]) -> bool:
    """Whether a Host header names an IP address (with or without a port), localhost, or one of `allowed_names`
    (lower case, without a trailing dot, as settings.allowed_hosts holds them)."""
    parts = HOST_HEADER.fullmatch(host)
    if parts is None:
        return False
    if parts["address"] is not None:
        return is_ip_address(parts["address"], ipaddress.IPv6Address)
    name = parts["name"].lower().removesuffix(".")
    # An empty Host (HTTP/1.1 allows one) names nothing to rebind, as no Host does.
    return name in ("", "localhost") or name in allowed_names or is_ip_address(name, ipaddress.IPv4Address)


def origin_allowed(origin: str, allowed_names: frozenset[str], cors_origins: frozenset[str]) -> bool:
    """Whether an Origin header is one of `cors_origins` exactly, or names a site whose host passes host_allowed (any
    scheme and port). `null`, an opaque origin (a sandboxed frame, a file:// page, a data: URL: what any page can make
    of itself), does not, nor does anything but `scheme://host[:port]`."""
    # A listed origin is the operator's own page, and a rebound page cannot claim it: its browser sends the origin the
    # page was loaded from, whatever that name now resolves to. Exact, as CORSMiddleware compares (a listed "*" lets no
    # Origin through here: no browser sends it).
    if origin in cors_origins:
        return True
    scheme, separator, host = origin.partition("://")
    return bool(scheme and separator and host) and "/" not in host and host_allowed(host, allowed_names)


def is_ip_address(text: str, kind: type[ipaddress.IPv4Address | ipaddress.IPv6Address]) -> bool:
    try:
        kind(text)
    except ValueError:
        return False
    return True


class AdminHostMiddleware:
    """403 JSON for a request to /admin whose Host, or whose Origin when it has one, is a name neither localhost nor
    in allowed_hosts (an Origin listed in cors_origins passes too); installed only while /admin needs no key (with
    one, the key is the defence).

    DNS rebinding: a page the operator opens on attacker.example has its name re-resolved to the service's address, so
    its requests are same-origin (a JSON POST needs no CORS preflight), yet still say `Host: attacker.example`. An IP
    address is no name to rebind, and localhost resolves on the operator's own machine. A reverse proxy that sets its
    own Host (nginx's default: the upstream's address) hides the page's name there, but the browser's Origin still
    says it: a browser sends Origin with every POST, and a page from a sandboxed frame or a file sends `null`, which
    is refused. A request without a Host, or an empty one (an HTTP/1.0 client, never a browser), passes, as one
    without an Origin does (curl, probes, scripts: no page sent it)."""

    def __init__(self, app: ASGIApp, settings: Settings, metrics: ServiceMetrics):
        self.app, self.metrics = app, metrics
        self.allowed_names = frozenset(name for name in settings.allowed_hosts.split(",") if name)
        self.cors_origins = frozenset(settings.cors_origins)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and is_under(routed_path(scope), ADMIN_PREFIX):
            for name, value in scope["headers"]:
                text = value.decode("latin-1")
                if name == b"host" and not host_allowed(text, self.allowed_names):
                    await self._refuse(scope, send, host_refusal("Host", text))
                    return
                if name == b"origin" and not origin_allowed(text, self.allowed_names, self.cors_origins):
                    await self._refuse(scope, send, host_refusal("Origin", text))
                    return
        await self.app(scope, receive, send)

    async def _refuse(self, scope: Scope, send: Send, message: str) -> None:
        self.metrics.rejected.labels("host_not_allowed").inc()
        await send_error(scope, send, 403, "host_not_allowed", message)


def host_refusal(header: str, value: str) -> str:
    """Why a Host or an Origin is refused, and what to do."""
    listed_origin = ", list the page's origin in CONVNEXT_CORS_ORIGINS" if header == "Origin" else ""
    return (f"/admin needs no key here, so it answers only requests addressed to (Host) and sent from pages at "
            f"(Origin) an IP address, localhost or a name in allowed_hosts, and this one's {header} is {shown(value)} "
            "(a web page can reach the service under its own site's name by DNS rebinding); call the service by its "
            f"address, add the name to CONVNEXT_ALLOWED_HOSTS (--allowed-hosts){listed_origin}, or set "
            "CONVNEXT_ADMIN_API_KEY")


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


# What a page on an allowed origin may send: the key, the body's type and encoding (gzip), the v2 binary tensor
# extension's header and its own request id; and what it may read of an answer: that header (to split a binary
# answer), Retry-After and the request's id (service/request_ids.py).
CORS_REQUEST_HEADERS = ["Authorization", "X-API-Key", "Content-Type", "Content-Encoding",
                        "Inference-Header-Content-Length", "X-Request-ID"]
CORS_EXPOSED_HEADERS = ["Inference-Header-Content-Length", "Retry-After", "X-Request-ID"]


def install_edge(app: FastAPI, settings: Settings, metrics: ServiceMetrics) -> None:
    """Auth when `api_key` or `admin_api_key` is set, else the Host and Origin check on /admin; then CORS (so
    preflights, 401s and 403s get its headers) when origins are set, then nosniff (outermost: on every answer of these
    too).

    The OpenAPI document declares the key and its 401s, or the Host check's 403 (service/openapi.py).
    """
    if admin_key(settings) is not None:
        app.add_middleware(ApiKeyMiddleware, settings=settings, metrics=metrics)
    else:
        app.add_middleware(AdminHostMiddleware, settings=settings, metrics=metrics)
    if settings.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_origins, allow_methods=["GET", "POST"],
                           allow_headers=CORS_REQUEST_HEADERS, expose_headers=CORS_EXPOSED_HEADERS)
    app.add_middleware(NoSniffMiddleware)
