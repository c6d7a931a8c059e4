"""The HTML pages are self-contained and hardened: /docs loads only the vendored Swagger UI files, served by a fixed
list of names; no /redoc; "/" allows exactly its own inline script and style by hash; nosniff on every answer."""
from __future__ import annotations

import base64
import hashlib
import http.client
import json
import re
import shutil
import socket
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest
from fastapi.testclient import TestClient
from test_web_page import CHROMIUM, CHROMIUM_ARGS

from service.app import create_app
from service.settings import Settings

SWAGGER_UI = Path(__file__).resolve().parents[2] / "service" / "static" / "swagger-ui"
VENDORED = {  # path the page must reference -> (vendored file, content type)
    "/docs/assets/swagger-ui-bundle.js": ("swagger-ui-bundle.js", "text/javascript; charset=utf-8"),
    "/docs/assets/swagger-ui.css": ("swagger-ui.css", "text/css; charset=utf-8"),
    "/docs/assets/favicon-32x32.png": ("favicon-32x32.png", "image/png"),
}
API_KEY = "docs-test-key-73b1"


@pytest.fixture(scope="module")
def browser():
    """Debian's headless Chromium, as test_web_page.py runs it (the Makefile's system-deps installs it)."""
    from playwright.sync_api import sync_playwright

    if shutil.which(CHROMIUM) is None:
        raise FileNotFoundError(f"{CHROMIUM} is missing: run `make system-deps` (apt-get install chromium)")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


def referenced_urls(html: str) -> list[str]:
    return re.findall(r"""\b(?:src|href)\s*=\s*["']([^"']*)["']""", html)


def raw_get(url: str, raw_path: str, headers: dict[str, str] | None = None) -> int:
    """The status of a GET for `raw_path` exactly as written: httpx would resolve `..` before sending it."""
    address = urlsplit(url)
    connection = http.client.HTTPConnection(address.hostname, address.port, timeout=10)
    try:
        connection.request("GET", raw_path, headers=headers or {})
        return connection.getresponse().status
    finally:
        connection.close()


def csp_hash(text: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode()).digest()).decode() + "'"


def test_docs_reference_only_the_vendored_assets_served_byte_for_byte(service_url):
    page = httpx.get(f"{service_url}/docs")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "http:" not in page.text and "https:" not in page.text  # no CDN, no favicon from elsewhere
    urls = referenced_urls(page.text)
    assert {urlsplit(url).path for url in urls} == set(VENDORED), urls
    for url in urls:
        assert url.startswith("/") and not url.startswith("//"), url  # same origin
        asset = httpx.get(service_url + url)
        file_name, content_type = VENDORED[urlsplit(url).path]
        assert asset.status_code == 200, url
        assert asset.headers["content-type"] == content_type
        assert asset.headers["x-content-type-options"] == "nosniff"
        assert "max-age=" in asset.headers["cache-control"]
        assert asset.content == (SWAGGER_UI / file_name).read_bytes(), url


def test_docs_never_call_the_swagger_validator_and_refuse_framing(service_url):
    page = httpx.get(f"{service_url}/docs")
    assert re.search(r'"validatorUrl":\s*null', page.text)  # else a badge from validator.swagger.io, told the URL
    assert "url: '/openapi.json'" in page.text
    assert page.headers["x-frame-options"] == "DENY"
    policy = page.headers["content-security-policy"]
    inline = re.search(r"<script>(.*?)</script>", page.text, re.DOTALL).group(1)
    assert policy.startswith(f"default-src 'none'; script-src 'self' {csp_hash(inline)}; ")
    assert "frame-ancestors 'none'" in policy and "unsafe-eval" not in policy
    assert "oauth2RedirectUrl" not in page.text and httpx.get(f"{service_url}/docs/oauth2-redirect").status_code == 404


def test_docs_behind_a_path_prefix_load_everything_under_it(model_repository):
    client = TestClient(create_app(Settings(repository=str(model_repository))), root_path="/convnext")
    page = client.get("/convnext/docs")
    assert page.status_code == 200
    assert {urlsplit(url).path for url in referenced_urls(page.text)} == {"/convnext" + path for path in VENDORED}
    assert "url: '/convnext/openapi.json'" in page.text
    assert client.get("/convnext/docs/assets/swagger-ui.css").status_code == 200
    # The prefix goes into the page's inline script, which the policy then allows by hash: only a plain one is used.
    hostile = TestClient(create_app(Settings(repository=str(model_repository))), root_path="/p';alert(1);'")
    refused = hostile.get("/p';alert(1);'/docs")
    assert refused.status_code == 400 and "alert" not in refused.text


@pytest.mark.parametrize("raw_path", [
    "/docs/assets/unknown.js", "/docs/assets/swagger-ui-bundle.js.map", "/docs/assets/index.html",
    "/docs/assets/LICENSE", "/docs/assets/..%2Fapp.py", "/docs/assets/..%2F..%2Fpages.py", "/docs/assets/../app.py",
    "/docs/assets/%2E%2E/%2E%2E/pages.py", "/docs/assets/",
])
def test_only_the_listed_asset_names_are_served(service_url, raw_path):
    assert raw_get(service_url, raw_path) == 404


def test_redoc_is_gone(service_url):
    assert httpx.get(f"{service_url}/redoc").status_code == 404


def test_the_docs_are_open_under_an_api_key_and_their_assets_route_opens_nothing_else(model_repository, launch):
    with launch(model_repository, api_key=API_KEY) as url:
        for path in ("/docs", *VENDORED):
            assert httpx.get(url + path).status_code == 200, path
        for raw_path in ("/docs/assets/../classify", "/docs/assets/swagger-ui.css/../../classify",
                         "/docs/assets/..%2Fclassify", "/docs/assets/unknown.js", "/docs/assets/../admin/reload",
                         "/docs/../classify", "/docs/oauth2-redirect", "/docs/assets/../../models/atto"):
            assert raw_get(url, raw_path) == 401, raw_path
        assert raw_get(url, "/docs/assets/unknown.js", {"X-API-Key": API_KEY}) == 404
        unauthorized = httpx.post(f"{url}/classify", content=b"x")
        assert unauthorized.status_code == 401
        assert unauthorized.headers["x-content-type-options"] == "nosniff"


def test_web_page_policy_allows_exactly_its_inline_script_and_style(service_url):
    page = httpx.get(f"{service_url}/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    (script,) = re.findall(r"<script>(.*?)</script>", page.text, re.DOTALL)  # what a browser hashes
    (style,) = re.findall(r"<style>(.*?)</style>", page.text, re.DOTALL)
    assert page.headers["content-security-policy"] == (
        f"default-src 'none'; script-src {csp_hash(script)}; style-src {csp_hash(style)}; img-src blob:; "
        "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
    assert page.headers["x-frame-options"] == "DENY"
    assert page.headers["referrer-policy"] == "no-referrer"
    assert page.headers["x-content-type-options"] == "nosniff"


def test_web_page_has_no_inline_handlers_or_style_attributes_the_policy_would_block(service_url):
    html = httpx.get(f"{service_url}/").text
    markup = re.sub(r"<(script|style)>.*?</\1>", "", html, flags=re.DOTALL)
    tags = re.findall(r"<[a-zA-Z][^>]*>", markup)
    assert len(tags) > 10
    for tag in tags:
        assert not re.search(r"\s(on[a-z]+|style)\s*=", tag, re.IGNORECASE), tag
    assert html.count("<script") == 1 and html.count("<style") == 1  # one of each, the ones hashed


def test_json_answers_carry_nosniff(service_url):
    for path in ("/models", "/healthz", "/no-such-path"):
        assert httpx.get(service_url + path).headers.get_list("x-content-type-options") == ["nosniff"], path


def test_both_pages_run_in_a_browser_under_their_policies_fetching_only_from_the_service(browser, service_url):
    page = browser.new_page()
    console, requested = [], []
    page.on("console", lambda message: console.append(message.text))
    page.on("request", lambda request: requested.append(request.url))
    page.goto(f"{service_url}/")
    page.locator("#served").filter(has_text="Serving atto version 1").wait_for()  # the inline script ran
    assert page.evaluate("getComputedStyle(document.querySelector('#drop-zone')).borderStyle") == "dashed"  # style
    page.goto(f"{service_url}/docs")
    page.locator(".swagger-ui .info .title").filter(has_text="ConvNeXt image classification").wait_for()
    assert page.locator(".opblock").count() > 5 and page.locator(".btn.authorize").count() == 0  # no key: no button
    models = page.locator(".opblock-get").filter(has=page.locator(".opblock-summary-path", has_text="/models"))
    models.first.locator(".opblock-summary").click()  # "Try it out" calls the service under the docs' policy
    models.first.locator(".try-out__btn").click()
    models.first.locator(".execute").click()
    models.first.locator(".live-responses-table .response-col_status").filter(has_text="200").wait_for()
    assert not [text for text in console if "Content Security Policy" in text], console
    assert requested and all(url.startswith(service_url + "/") for url in requested), requested
    page.close()


def try_it_out(page, method: str, path: str) -> str:
    """Swagger UI's "Try it out" + "Execute" on one operation; the status it shows."""
    operation = page.locator(f".opblock-{method}").filter(
        has=page.locator(".opblock-summary-path", has_text=re.compile(f"^{re.escape(path)}$"))).first
    operation.locator(".opblock-summary").click()
    operation.locator(".try-out__btn").click()
    operation.locator(".execute").click()
    status = operation.locator(".live-responses-table tbody .response-col_status").first
    status.wait_for()
    return status.inner_text()


def test_the_docs_send_each_call_only_the_key_it_needs_with_an_admin_key(browser, model_repository, launch):
    """With api_key and admin_api_key both set, Authorize takes both keys (a scheme pair for each) and each call
    sends only its own: a call carrying both would be refused (every key presented must be the key)."""
    keys = {"bearer": "docs-inference-key", "admin_api_key": "docs-admin-key"}
    with launch(model_repository, api_key=keys["bearer"], admin_api_key=keys["admin_api_key"]) as url:
        page = browser.new_page()
        page.set_default_timeout(15_000)
        sent = {}
        page.on("request", lambda request: sent.setdefault(urlsplit(request.url).path, {
            name: value for name, value in request.headers.items() if name in ("authorization", "x-api-key")}))
        page.goto(f"{url}/docs")
        page.locator(".btn.authorize").first.click()
        for scheme, key in keys.items():
            box = page.locator(".auth-container").filter(has=page.locator("h4", has_text=re.compile(f"^{scheme}\\b")))
            box.locator("input").fill(key)
            box.locator("button.authorize").click()
        page.locator(".btn-done").first.click()
        assert try_it_out(page, "get", "/v2") == "200"
        assert sent["/v2"] == {"authorization": f"Bearer {keys['bearer']}"}
        assert try_it_out(page, "post", "/admin/reload") == "200"  # its example body: the one version again
        assert sent["/admin/reload"] == {"x-api-key": keys["admin_api_key"]}
        page.close()


def test_the_servers_own_refusals_carry_nosniff_too(service_url):
    """A head over 64 KiB is refused by the server itself (431), before the app and its middleware."""
    refused = httpx.get(f"{service_url}/healthz", headers={"X-Padding": "x" * 70_000})
    assert refused.status_code == 431
    assert refused.headers.get_list("x-content-type-options") == ["nosniff"]


def test_bytes_that_are_not_http_get_the_json_400_with_nosniff(service_url):
    """uvicorn's own answer to an unparseable request was text/plain without nosniff; the server now writes the
    service's JSON error, counts it, and closes the connection."""
    address = urlsplit(service_url)
    with socket.create_connection((address.hostname, address.port), timeout=10) as connection:
        connection.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nBad Header Line\r\n\r\n")
        answer = b""
        while chunk := connection.recv(65536):  # the server closes after its answer
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.lower().split(": ", 1) for line in lines[1:])
    assert lines[0] == "HTTP/1.1 400 Bad Request"
    assert headers["content-type"] == "application/json"
    assert headers["x-content-type-options"] == "nosniff"
    assert headers["connection"] == "close"
    assert json.loads(body)["error"]["code"] == "bad_request"
    assert 'convnext_rejected_total{reason="bad_request"}' in httpx.get(service_url + "/metrics").text
