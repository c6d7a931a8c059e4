"""The HTTP edge over real HTTP: API-key auth, CORS off by default and per origin, and no user-supplied paths."""
from __future__ import annotations

import re

import httpx
import pytest

from service import api_keys
from service.settings import Settings
from tests.service.conftest import metric

API_KEY = "test-key-4f1c9a"
APP_ORIGIN = "https://app.example"


@pytest.fixture(scope="module")
def secured_url(model_repository, launch, tmp_path_factory):
    """Key from a file (as a Docker/K8s secret is mounted), CORS for one origin."""
    key_file = tmp_path_factory.mktemp("secrets") / "api_key"
    key_file.write_text(API_KEY + "\n")
    with launch(model_repository, api_key_file=str(key_file), cors_origins=[APP_ORIGIN]) as url:
        yield url


def classify(url, data, headers=None):
    return httpx.post(f"{url}/classify", content=data, headers={"content-type": "image/jpeg", **(headers or {})})


def assert_unauthorized(response: httpx.Response) -> None:
    assert response.status_code == 401, response.text
    assert response.headers["www-authenticate"] == "Bearer"
    body = response.json()  # on /v2 paths the protocol's body: {"error": "<message>", "code": ...}
    assert (body["code"] if isinstance(body["error"], str) else body["error"]["code"]) == "unauthorized"
    assert response.request.url.path.startswith("/v2") == isinstance(body["error"], str)


def test_inference_and_admin_need_the_key_and_accept_either_header(secured_url, real_photos):
    jpeg = real_photos[0].read_bytes()
    assert_unauthorized(classify(secured_url, jpeg))
    wrong = classify(secured_url, jpeg, {"Authorization": "Bearer not-the-key"})
    assert_unauthorized(wrong)
    assert "not-the-key" not in wrong.text and API_KEY not in wrong.text
    assert_unauthorized(classify(secured_url, jpeg, {"X-API-Key": API_KEY[:-1]}))
    basic_only = classify(secured_url, jpeg, {"Authorization": f"Basic {API_KEY}"})
    assert_unauthorized(basic_only)
    assert "no API key" in basic_only.json()["error"]["message"]
    assert_unauthorized(httpx.post(f"{secured_url}/admin/reload", json={}))
    assert_unauthorized(httpx.post(f"{secured_url}/v2/models/atto/infer", json={"inputs": []}))

    # The right key beside a wrong one: every key presented must be the key.
    assert_unauthorized(classify(secured_url, jpeg, {"X-API-Key": API_KEY, "Authorization": "Bearer wrong"}))
    assert classify(secured_url, jpeg, {"Authorization": f"Bearer {API_KEY}"}).status_code == 200
    assert classify(secured_url, jpeg, {"X-API-Key": API_KEY}).status_code == 200
    # Another Authorization scheme is not a key of ours: a proxy's HTTP Basic login, which browsers re-send on every
    # same-origin request, beside the right key.
    assert classify(secured_url, jpeg, {"X-API-Key": API_KEY, "Authorization": "Basic dXNlcjpwYXNz"}).status_code == 200
    metrics = httpx.get(f"{secured_url}/metrics").text
    assert 'convnext_rejected_total{reason="unauthorized"} 7.0' in metrics
    assert API_KEY not in metrics


def recorded_compare_digest(monkeypatch) -> list[tuple[bytes, bytes]]:
    """Wrap hmac.compare_digest where service.api_keys looks it up; returns the (presented, key) pairs it compares."""
    compared, compare_digest = [], api_keys.hmac.compare_digest

    def recording(presented, key):
        compared.append((presented, key))
        return compare_digest(presented, key)

    monkeypatch.setattr(api_keys.hmac, "compare_digest", recording)
    return compared


def test_keys_are_compared_in_constant_time(secured_url, real_photos, monkeypatch):
    """`==` on bytes returns at the first differing byte: its timing would let a caller guess the key byte by byte."""
    compared = recorded_compare_digest(monkeypatch)
    jpeg = real_photos[0].read_bytes()
    assert_unauthorized(classify(secured_url, jpeg, {"X-API-Key": "not-the-key"}))
    assert classify(secured_url, jpeg, {"Authorization": f"Bearer {API_KEY}"}).status_code == 200
    assert compared == [(b"not-the-key", API_KEY.encode()), (API_KEY.encode(), API_KEY.encode())]


def test_probes_metrics_page_and_docs_stay_open(secured_url):
    for path in ("/healthz", "/readyz", "/metrics", "/", "/docs", "/openapi.json"):
        assert httpx.get(f"{secured_url}{path}").status_code == 200, path
    schema = httpx.get(f"{secured_url}/openapi.json").json()
    assert set(schema["components"]["securitySchemes"]) == {"bearer", "api_key"}
    assert schema["paths"]["/classify"]["post"]["security"]
    assert "security" not in schema["paths"]["/healthz"]["get"]


def test_cors_allows_only_the_configured_origin_and_preflight_needs_no_key(secured_url, real_photos):
    preflight = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "x-api-key"}
    allowed = httpx.options(f"{secured_url}/classify", headers={"Origin": APP_ORIGIN, **preflight})
    assert allowed.status_code == 200
    assert allowed.headers["access-control-allow-origin"] == APP_ORIGIN
    other = httpx.options(f"{secured_url}/classify", headers={"Origin": "https://evil.example", **preflight})
    assert "access-control-allow-origin" not in other.headers
    # A refused request from the allowed page still carries CORS headers, so the page can show the error.
    refused = classify(secured_url, real_photos[0].read_bytes(), {"Origin": APP_ORIGIN})
    assert_unauthorized(refused)
    assert refused.headers["access-control-allow-origin"] == APP_ORIGIN


def test_cors_lets_an_allowed_page_use_the_v2_binary_extension_and_gzip_and_read_their_headers(secured_url):
    """A preflight for v2 infer with the binary tensor extension's header, a gzip body and the page's own request id
    is allowed, and an answer lets the page read Inference-Header-Content-Length (to split a binary answer),
    Retry-After and X-Request-ID."""
    preflight = {"Origin": APP_ORIGIN, "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "x-api-key, content-type, content-encoding, "
                                                   "inference-header-content-length, x-request-id"}
    allowed = httpx.options(f"{secured_url}/v2/models/atto/infer", headers=preflight)
    assert allowed.status_code == 200, allowed.text
    answer = httpx.get(f"{secured_url}/healthz", headers={"Origin": APP_ORIGIN})
    exposed = {h.strip().lower() for h in answer.headers["access-control-expose-headers"].split(",")}
    assert exposed == {"inference-header-content-length", "retry-after", "x-request-id"}


def test_without_settings_there_is_no_auth_and_no_cors(service_url, real_photos):
    preflight = httpx.options(f"{service_url}/classify", headers={
        "Origin": APP_ORIGIN, "Access-Control-Request-Method": "POST"})
    assert "access-control-allow-origin" not in preflight.headers
    response = classify(service_url, real_photos[0].read_bytes(), {"Origin": APP_ORIGIN})
    assert response.status_code == 200
    assert "access-control-allow-origin" not in response.headers


def test_api_key_settings_read_the_file_refuse_empty_keys_and_never_print_the_key(tmp_path, monkeypatch):
    key_file = tmp_path / "key"
    key_file.write_text(f"  {API_KEY}\n")
    monkeypatch.setenv("CONVNEXT_API_KEY_FILE", str(key_file))
    settings = Settings()
    assert settings.api_key.get_secret_value() == API_KEY
    assert API_KEY not in repr(settings) and API_KEY not in str(settings)
    with pytest.raises(ValueError, match="not both") as both:
        Settings(api_key=API_KEY)
    assert API_KEY not in str(both.value)
    monkeypatch.delenv("CONVNEXT_API_KEY_FILE")
    with pytest.raises(ValueError, match="cannot read"):
        Settings(api_key_file=str(tmp_path / "missing"))
    key_file.write_text("\n")
    with pytest.raises(ValueError, match="api_key is empty"):
        Settings(api_key_file=str(key_file))
    with pytest.raises(ValueError, match="api_key is empty"):
        Settings(api_key=" ")
    key_file.write_text("cl\u00e9\n")
    with pytest.raises(ValueError, match=f"CONVNEXT_API_KEY_FILE \\({key_file}\\): the key holds .* visible ASCII"):
        Settings(api_key_file=str(key_file))
    key_file.write_bytes(b"cl\xe9\n")  # Latin-1, not UTF-8: no decoding error quoting the byte
    with pytest.raises(ValueError, match="visible ASCII") as latin1:
        Settings(api_key_file=str(key_file))
    assert "0xe9" not in str(latin1.value)


def test_a_key_variable_is_stripped_like_a_key_file(model_repository, launch, real_photos, monkeypatch):
    """A Kubernetes secret made with `kubectl create secret --from-file` keeps the file's newline, as an environment
    variable too; no header can carry it, so unstripped every request would be refused."""
    monkeypatch.setenv("CONVNEXT_API_KEY", API_KEY + "\n")
    jpeg = real_photos[0].read_bytes()
    with launch(model_repository) as url:
        assert classify(url, jpeg, {"X-API-Key": API_KEY}).status_code == 200
        assert classify(url, jpeg, {"Authorization": f"Bearer {API_KEY}"}).status_code == 200


@pytest.mark.parametrize(("variable", "key"), [("CONVNEXT_API_KEY", "clé"), ("CONVNEXT_ADMIN_API_KEY", "two words")])
def test_a_key_headers_cannot_carry_alike_stops_the_start_naming_its_variable(tmp_path, monkeypatch, capsys, variable,
                                                                             key):
    """A browser sends a header's non-ASCII characters as Latin-1, curl as UTF-8: a key such as "clé" could never
    match from the web page. Refused at start (status 2, as any invalid setting), naming the variable, not the key;
    before the repository is read (an empty one here: a start that got that far would end 1, never serve)."""
    from service.__main__ import main

    monkeypatch.setenv(variable, key)
    assert main(["--repository", str(tmp_path), "--port", "0", "--grpc-port", "0"]) == 2
    error = capsys.readouterr().err
    assert "invalid settings" in error and f"{variable}: the key holds" in error and key not in error


def test_no_endpoint_takes_a_path_or_url_from_the_request(model_repository):
    """Every parameter and JSON body field in the schema: none names a path, URL or file to open."""
    from service.app import create_app

    schema = create_app(Settings(repository=str(model_repository))).openapi()
    suspicious = re.compile(r"path|url|uri|file|dir|location|href|src", re.IGNORECASE)
    names = []
    for path, operations in schema["paths"].items():
        for operation in operations.values():
            names += [(path, p["name"]) for p in operation.get("parameters", [])]
            for content in operation.get("requestBody", {}).get("content", {}).values():
                ref = content["schema"].get("$ref", "") or content["schema"].get("anyOf", [{}])[0].get("$ref", "")
                body = schema["components"]["schemas"].get(ref.rsplit("/", 1)[-1], content["schema"])  # or inline
                names += [(path, name) for name, field in body.get("properties", {}).items()
                          if "binary" not in (field.get("format"), field.get("items", {}).get("format"))]  # uploads
    assert names, "the walk found no parameters at all: the schema layout changed"
    assert [(path, name) for path, name in names if suspicious.search(name)] == []


ADMIN_KEY = "admin-key-7d20e1"


def test_an_admin_key_guards_admin_alone_and_the_inference_key_cannot_reload(model_repository, launch, real_photos):
    """With admin_api_key set, /admin/* takes that key and no other: a client holding the inference key can classify
    but not swap the model; without api_key, inference stays open and /admin still needs its key."""
    jpeg = real_photos[0].read_bytes()
    reload = {"json": {}, "timeout": 60}
    with launch(model_repository, api_key=API_KEY, admin_api_key=ADMIN_KEY) as url:
        assert classify(url, jpeg, {"X-API-Key": API_KEY}).status_code == 200
        assert_unauthorized(classify(url, jpeg, {"X-API-Key": ADMIN_KEY}))
        assert_unauthorized(httpx.post(f"{url}/admin/reload", headers={"X-API-Key": API_KEY}, **reload))
        assert httpx.post(f"{url}/admin/reload", headers={"X-API-Key": ADMIN_KEY}, **reload).status_code == 200
        document = httpx.get(f"{url}/openapi.json").json()
        schema = document["paths"]
        assert "401" in schema["/admin/reload"]["post"]["responses"] and "401" in schema["/classify"]["post"][
            "responses"]
        # Each key its own pair of schemes, so the docs send each call only its key (test_docs_pages.py).
        assert schema["/classify"]["post"]["security"] == [{"bearer": []}, {"api_key": []}]
        assert schema["/admin/reload"]["post"]["security"] == [{"admin_bearer": []}, {"admin_api_key": []}]
        assert set(document["components"]["securitySchemes"]) == {"bearer", "api_key", "admin_bearer",
                                                                   "admin_api_key"}
    with launch(model_repository, admin_api_key=ADMIN_KEY) as url:
        assert classify(url, jpeg).status_code == 200
        assert_unauthorized(httpx.post(f"{url}/admin/reload", **reload))
        # The key is the defence here: no Host rule (a rebinding page does not hold the key).
        assert httpx.post(f"{url}/admin/reload", headers={"Authorization": f"Bearer {ADMIN_KEY}",
                                                          "Host": "any-name.example"}, **reload).status_code == 200
        document = httpx.get(f"{url}/openapi.json").json()
        schema = document["paths"]
        assert "401" in schema["/admin/reload"]["post"]["responses"]
        assert "401" not in schema["/classify"]["post"]["responses"]
        assert set(document["components"]["securitySchemes"]) == {"admin_bearer", "admin_api_key"}


def host_refusal(refused: httpx.Response) -> str:
    """The message of /admin's refusal of a Host or Origin: 403 host_not_allowed, nosniff."""
    assert refused.status_code == 403 and refused.headers["x-content-type-options"] == "nosniff"
    error = refused.json()["error"]
    assert error["code"] == "host_not_allowed"
    return error["message"]


def test_without_a_key_admin_answers_only_an_address_localhost_or_an_allowed_name(model_repository, launch,
                                                                                   real_photos):
    """DNS rebinding: a page the operator opens on rebind.attacker.example has that name re-resolved to the service,
    so its JSON POST is same-origin (no CORS preflight), Host and Origin naming the attacker's site. With no key,
    /admin refuses such a Host; an IP address, localhost and the names in allowed_hosts pass. Inference and the read
    routes take any Host: they are what the service is for, and a key is what guards them."""
    jpeg = real_photos[0].read_bytes()
    missing = {"json": {"version": 99}, "timeout": 60}  # 404 version_not_found: past the Host check, nothing built
    with launch(model_repository, allowed_hosts="convnext-serve, Model.Internal.") as url:
        port = url.rsplit(":", 1)[1]
        rebound = {"Host": f"rebind.attacker.example:{port}", "Origin": f"http://rebind.attacker.example:{port}"}
        message = host_refusal(httpx.post(f"{url}/admin/reload", headers=rebound, json={}, timeout=60))
        assert "'rebind.attacker.example:" in message and "CONVNEXT_ALLOWED_HOSTS" in message
        for host in ("127.0.0.1", f"127.0.0.1:{port}", "[::1]", f"[::1]:{port}", f"localhost:{port}", "LOCALHOST",
                     f"convnext-serve:{port}", "model.internal"):
            assert httpx.post(f"{url}/admin/reload", headers={"Host": host}, **missing).status_code == 404, host
        for host in ("convnext-serve.attacker.example", "localhost.attacker.example", "10.0.0.1.nip.io", "[1.2.3.4]"):
            assert httpx.post(f"{url}/admin/reload", headers={"Host": host}, **missing).status_code == 403, host
        assert httpx.post(f"{url}/admin/reload", headers={"Host": "convnext-serve"}, json={},
                          timeout=60).status_code == 200
        assert httpx.get(f"{url}/models", headers=rebound).status_code == 200
        assert classify(url, jpeg, rebound).status_code == 200
        assert 'convnext_rejected_total{reason="host_not_allowed"} 5.0' in httpx.get(f"{url}/metrics").text
        reload_answers = httpx.get(f"{url}/openapi.json").json()["paths"]["/admin/reload"]["post"]["responses"]
        assert "403" in reload_answers and "401" not in reload_answers


def test_without_a_key_admin_refuses_an_origin_the_host_check_would_refuse(model_repository, launch):
    """Behind a reverse proxy that sets its own Host (nginx's default `proxy_set_header Host $proxy_host`: the
    upstream's 127.0.0.1:8000), a rebound page's request reaches /admin with an allowed Host; its browser's Origin still
    names the attacker's site. An Origin passes by the Host rule (an address, localhost, an allowed name), `null` (a
    sandboxed frame's or a file's page) does not, and a request without one (curl, scripts) passes."""
    missing = {"json": {"version": 99}, "timeout": 60}  # 404 version_not_found: past the check, nothing built
    with launch(model_repository, allowed_hosts="convnext-serve") as url:
        port = url.rsplit(":", 1)[1]
        proxied = {"Host": f"127.0.0.1:{port}", "Origin": f"http://rebind.attacker.example:{port}"}
        message = host_refusal(httpx.post(f"{url}/admin/reload", headers=proxied, json={}, timeout=60))
        assert "Origin is 'http://rebind.attacker.example:" in message
        assert "CONVNEXT_ALLOWED_HOSTS" in message
        for origin in ("null", "rebind.attacker.example", "http://", "http://convnext-serve.attacker.example",
                       "https://10.0.0.1.nip.io", "http://127.0.0.1/path"):
            answer = httpx.post(f"{url}/admin/reload", headers={"Origin": origin}, **missing)
            assert answer.status_code == 403, origin
        for origin in (url, f"http://[::1]:{port}", "http://localhost:3000", "https://convnext-serve",
                       "http://CONVNEXT-SERVE.:8000"):
            assert httpx.post(f"{url}/admin/reload", headers={"Origin": origin}, **missing).status_code == 404, origin
        assert httpx.post(f"{url}/admin/reload", **missing).status_code == 404  # no Origin: not from a page
        assert 'convnext_rejected_total{reason="host_not_allowed"} 7.0' in httpx.get(f"{url}/metrics").text


def test_without_a_key_admin_answers_a_page_at_an_origin_listed_in_cors_origins(model_repository, launch):
    """The operator's dashboard at a listed CORS origin calls /admin/reload: its preflight passes, so its POST must
    too (a rebound page cannot send that Origin: its browser names the site the page came from). Only the exact origin
    passes; another scheme or port of that name is judged by the Host rule and refused."""
    missing = {"json": {"version": 99}, "timeout": 60}  # 404 version_not_found: past the check, nothing built
    with launch(model_repository, cors_origins=["https://ops.example"]) as url:
        preflight = httpx.options(f"{url}/admin/reload", headers={
            "Origin": "https://ops.example", "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "content-type"})
        assert preflight.status_code == 200
        answer = httpx.post(f"{url}/admin/reload", headers={"Origin": "https://ops.example"}, **missing)
        assert answer.status_code == 404, answer.text
        assert answer.headers["access-control-allow-origin"] == "https://ops.example"
        for origin in ("http://ops.example", "https://ops.example:8443", "https://rebind.ops.example"):
            refused = httpx.post(f"{url}/admin/reload", headers={"Origin": origin}, **missing)
            assert refused.status_code == 403, origin
            assert "CONVNEXT_CORS_ORIGINS" in refused.json()["error"]["message"]


def test_allowed_hosts_takes_names_only():
    from service.__main__ import settings_from_args

    assert settings_from_args(["--allowed-hosts", "convnext-serve, Serve.Default.svc.cluster.local.,"]
                              ).allowed_hosts == "convnext-serve,serve.default.svc.cluster.local"
    for entry in ("http://convnext-serve", "convnext-serve:8000", "*.example", "two words"):
        with pytest.raises(ValueError, match="is not a host name"):
            Settings(allowed_hosts=entry)


def test_cli_takes_origins_as_json_and_has_no_flag_for_the_key_itself():
    from service.__main__ import settings_from_args

    settings = settings_from_args(["--cors-origins", f'["{APP_ORIGIN}"]', "--ort-spinning", "false"])
    assert settings.cors_origins == [APP_ORIGIN] and settings.ort_spinning is False
    with pytest.raises(SystemExit):  # a command line is visible to every user of the host: env or file only
        settings_from_args(["--api-key", API_KEY])
    with pytest.raises(SystemExit):
        settings_from_args(["--admin-api-key", ADMIN_KEY])
    with pytest.raises(SystemExit):
        settings_from_args(["--cors-origins", APP_ORIGIN])


def requests_counted(url: str, method: str, route: str, status: int) -> float:
    return metric(url, f'convnext_requests_total{{method="{method}",route="{route}",status="{status}"}}')


def test_a_request_refused_before_routing_is_counted_under_the_route_its_path_names(secured_url, real_photos):
    """A 401 (and a CORS preflight, answered before the key check) goes under the route the request was for, as the
    admission gate's 503 does: a dashboard filtered on /classify sees them. A path that is no route stays
    "unmatched"."""
    preflight = {"Origin": APP_ORIGIN, "Access-Control-Request-Method": "POST"}
    requests = [
        (lambda: classify(secured_url, real_photos[0].read_bytes()), "POST", "/classify", 401),
        (lambda: httpx.post(f"{secured_url}/v2/models/atto/infer", json={}), "POST", "/v2/models/{name}/infer", 401),
        (lambda: httpx.get(f"{secured_url}/classify"), "GET", "/classify", 401),  # the router would answer 405
        (lambda: httpx.options(f"{secured_url}/classify", headers=preflight), "OPTIONS", "/classify", 200),
        (lambda: httpx.post(f"{secured_url}/no-such-route"), "POST", "unmatched", 401),
    ]
    for send, method, route, status in requests:
        before = requests_counted(secured_url, method, route, status)
        assert send().status_code == status, (method, route)
        assert requests_counted(secured_url, method, route, status) == before + 1, (method, route)


def test_without_a_key_an_admin_403_is_counted_under_its_route(model_repository, launch):
    with launch(model_repository) as url:
        host_refusal(httpx.post(f"{url}/admin/reload", headers={"Host": "rebind.attacker.example"}, json={}))
        assert requests_counted(url, "POST", "/admin/reload", 403) == 1
        assert requests_counted(url, "POST", "unmatched", 403) == 0
