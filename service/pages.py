"""The service's HTML pages, self-contained and with their security headers: the web page at "/" and the Swagger UI
API docs at /docs, whose script, stylesheet and icon the service serves itself (no CDN: the docs work on an
air-gapped host, and no third party runs script in the origin where an operator types the API key).

static/swagger-ui/ holds swagger-ui-dist 5.35.0 from the npm registry, the files copied unchanged (Apache-2.0;
static/swagger-ui/SOURCE.txt). To update it, copy the same files from the new version and change SWAGGER_UI_VERSION.
"""
from __future__ import annotations

import base64
import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

from fastapi import APIRouter, HTTPException, Request
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response

STATIC = Path(__file__).parent / "static"
WEB_PAGE = STATIC / "index.html"
SWAGGER_UI = STATIC / "swagger-ui"
SWAGGER_UI_VERSION = "5.35.0"  # in the asset URLs, so browsers fetch an updated copy at once
DOCS_PATH = "/docs"
DOCS_ASSETS_PATH = "/docs/assets/"
SAFE_ROOT_PATH = re.compile(r"[A-Za-z0-9/_.~-]*")  # a proxy prefix the page may embed as it is
SWAGGER_UI_MEDIA_TYPES = {
    "swagger-ui-bundle.js": "text/javascript; charset=utf-8",
    "swagger-ui.css": "text/css; charset=utf-8",
    "favicon-32x32.png": "image/png",
}
# Name in the URL -> (file, media type): the only files the assets route serves. A request's name is looked up here
# (404 otherwise) and never becomes part of a file path.
SWAGGER_UI_ASSETS = {name: (SWAGGER_UI / name, media_type) for name, media_type in SWAGGER_UI_MEDIA_TYPES.items()}
ASSET_CACHE_CONTROL = "public, max-age=86400"  # a day; the ?v= in their URLs changes with the version
# Open without a key (service.security.PUBLIC_PATHS): the docs page and the named assets only.
DOCS_PUBLIC_PATHS = frozenset({DOCS_PATH, *(DOCS_ASSETS_PATH + name for name in SWAGGER_UI_ASSETS)})
# The docs' policy: Swagger UI's own script and the page's inline start-up script (by hash), its stylesheet and the
# inline styles React sets, data: images from that stylesheet, requests to the service itself ("Try it out"); nothing
# may frame it (clickjacking the Authorize dialog). Checked in Chromium (tests/service/test_docs_pages.py).
# validatorUrl None: Swagger UI would otherwise load a badge from validator.swagger.io, telling it the document's URL.
DOCS_POLICY = ("default-src 'none'; script-src 'self' {script}; style-src 'self' 'unsafe-inline'; "
               "img-src 'self' data:; connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
DOCS_HEADERS = {"X-Frame-Options": "DENY", "Content-Security-Policy": "frame-ancestors 'none'"}
SWAGGER_UI_PARAMETERS = {"validatorUrl": None}
# The web page's policy: its own inline script and style by hash, the preview from a blob: URL, fetches to the
# service itself; nothing else loads, and nothing may frame it.
WEB_PAGE_POLICY = ("default-src 'none'; script-src {script}; style-src {style}; img-src blob:; connect-src 'self'; "
                   "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")


def inline_source_hash(html: str, tag: str, page: object = WEB_PAGE) -> str:
    """The CSP source expression ('sha256-<base64>') of the page's one inline <tag> element (one without attributes),
    hashed as a browser does: the UTF-8 text between the tags, after the HTML parser's newline normalization."""
    sources = re.findall(rf"<{tag}>(.*?)</{tag}>", html, re.DOTALL)
    if len(sources) != 1:
        raise ValueError(f"{page} must hold exactly one inline <{tag}> element, without attributes: its policy allows "
                         f"that one by hash (service/pages.py)")
    text = sources[0].replace("\r\n", "\n").replace("\r", "\n")
    digest = hashlib.sha256(text.encode()).digest()
    return f"'sha256-{base64.b64encode(digest).decode()}'"


@dataclass(frozen=True)
class WebPage:
    """index.html as served, with the headers that go with it: its Content-Security-Policy allows exactly its own
    inline script and style."""

    html: bytes
    headers: dict[str, str]

    @classmethod
    def read(cls, path: Path) -> WebPage:
        html = path.read_bytes()
        text = html.decode()
        policy = WEB_PAGE_POLICY.format(script=inline_source_hash(text, "script"),
                                        style=inline_source_hash(text, "style"))
        return cls(html, {"Content-Security-Policy": policy, "X-Frame-Options": "DENY",
                          "Referrer-Policy": "no-referrer"})


def swagger_ui_page(request: Request) -> HTMLResponse:
    """FastAPI's Swagger UI page on the vendored assets; every URL carries the proxy's path prefix (root_path), as
    FastAPI's own /docs does."""
    root_path = request.scope.get("root_path", "").rstrip("/")
    if not SAFE_ROOT_PATH.fullmatch(root_path):  # it goes into the page's script and URLs, unescaped, then is hashed
        raise HTTPException(400, "the proxy's path prefix (root_path) has characters /docs cannot carry")

    def asset_url(name: str) -> str:
        return f"{root_path}{DOCS_ASSETS_PATH}{name}?v={SWAGGER_UI_VERSION}"

    page = get_swagger_ui_html(openapi_url=root_path + request.app.openapi_url,
                               title=f"{request.app.title} - Swagger UI",
                               swagger_js_url=asset_url("swagger-ui-bundle.js"),
                               swagger_css_url=asset_url("swagger-ui.css"),
                               swagger_favicon_url=asset_url("favicon-32x32.png"),
                               oauth2_redirect_url=None,  # the API has no OAuth2 flow
                               swagger_ui_parameters=SWAGGER_UI_PARAMETERS)
    policy = DOCS_POLICY.format(script=inline_source_hash(bytes(page.body).decode(), "script", "the Swagger UI page"))
    page.headers.update({**DOCS_HEADERS, "Content-Security-Policy": policy})
    return page


def pages_router() -> APIRouter:
    """The page routes, none in the OpenAPI document; reads index.html once, here (the app's creation)."""
    router = APIRouter(include_in_schema=False)
    web_page = WebPage.read(WEB_PAGE) if WEB_PAGE.is_file() else None

    @router.get("/")
    async def index() -> Response:
        if web_page is None:
            return JSONResponse({"service": "convnext", "docs": DOCS_PATH, "classify": "POST /classify"})
        return HTMLResponse(web_page.html, headers=web_page.headers)

    @router.get(DOCS_PATH)
    async def swagger_ui(request: Request) -> HTMLResponse:
        return swagger_ui_page(request)

    @router.get(DOCS_ASSETS_PATH + "{name}")
    async def swagger_ui_asset(name: str) -> FileResponse:
        asset = SWAGGER_UI_ASSETS.get(name)
        if asset is None:
            raise HTTPException(404, "Not Found")  # as for any unknown path
        path, media_type = asset
        return FileResponse(path, media_type=media_type, headers={"Cache-Control": ASSET_CACHE_CONTROL})

    return router
