"""Request correlation ids over real HTTP and gRPC: every answer the app gives carries X-Request-ID (the client's own
when safe, else a fresh one), the unexpected-error handler's 500 and its log line included, and every gRPC answer
carries it in its trailing metadata, beside the trailers the refusal sets."""
from __future__ import annotations

import logging
import logging.config
import re
import socket
import time
from urllib.parse import urlsplit

import grpc
import httpx
import pytest

from service.access_log import ACCESS_LOG, LOGGER, AccessLineFormatter, AccessLog
from service.grpc_proto import open_inference_pb2 as pb
from service.grpc_server import ERROR_CODE_KEY, RETRY_PUSHBACK_KEY
from service.request_ids import REQUEST_ID_SCOPE_KEY
from service.server import log_config
from tests.service.conftest import access_lines, free_port, metric
from tests.service.test_grpc import grpc_address
from tests.service.test_grpc_limits import infer_message

API_KEY = "rid-key"
KEY = {"X-API-Key": API_KEY}
APP_ORIGIN = "https://app.example"
MAX_BODY_BYTES = 100_000
FRESH_ID = re.compile(r"[0-9a-f]{32}")
CLIENT_ID = "3f2a9c1e-4b5d:trace/span=1.2_~@+"  # every kind of character the rule lets through
UNSAFE_IDS = ["", "two words", 'a"quote', "x" * 129, "café", "line\tbreak", "-", "..."]  # "-": the log's "none"


@pytest.fixture(scope="module")
def served(model_repository, launch):
    """One server: an API key (HTTP and gRPC), CORS for one origin, a small body limit, and a route with a bug."""
    with launch(model_repository, api_key=API_KEY, cors_origins=[APP_ORIGIN], max_body_bytes=MAX_BODY_BYTES,
                grpc_port=free_port(), warmup_runs=0) as url:

        async def bug():
            raise KeyError("a bug")

        url.app.add_api_route("/bug", bug)  # routes are looked up per request: added once the server runs
        yield url


def request_id(response: httpx.Response) -> str:
    ids = response.headers.get_list("x-request-id")
    assert len(ids) == 1, (response.status_code, ids)
    return ids[0]


def test_a_safe_client_id_is_echoed(served):
    assert request_id(httpx.get(f"{served}/healthz", headers={"X-Request-ID": CLIENT_ID})) == CLIENT_ID
    assert request_id(httpx.get(f"{served}/healthz", headers={"X-Request-ID": "x" * 128})) == "x" * 128
    # Repeated: the first header is the request's id.
    repeated = httpx.get(f"{served}/healthz", headers=[("X-Request-ID", "first"), ("X-Request-ID", "second")])
    assert request_id(repeated) == "first"


@pytest.mark.parametrize("unsafe", UNSAFE_IDS)
def test_an_unsafe_client_id_is_replaced_by_a_fresh_one_never_echoed_nor_refused(served, unsafe):
    response = httpx.get(f"{served}/healthz", headers=[(b"X-Request-ID", unsafe.encode())])
    assert response.status_code == 200
    assert FRESH_ID.fullmatch(request_id(response))
    assert not unsafe or unsafe.encode() not in response.content


def test_requests_without_an_id_get_different_fresh_ids(served):
    first, second = (request_id(httpx.get(f"{served}/healthz")) for _ in range(2))
    assert FRESH_ID.fullmatch(first) and FRESH_ID.fullmatch(second) and first != second


def test_errors_from_routes_validation_and_the_edge_carry_the_id(served):
    preflight = {"Origin": APP_ORIGIN, "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "x-api-key, x-request-id"}  # a page may send its own id
    answers = {
        (404, "not_found"): httpx.get(f"{served}/nowhere", headers={**KEY, "X-Request-ID": "r404"}),
        (422, "invalid_parameter"): httpx.post(f"{served}/classify?top_k=0", content=b"x",
                                               headers={**KEY, "X-Request-ID": "r422"}),
        (413, "body_too_large"): httpx.post(f"{served}/classify", content=bytes(MAX_BODY_BYTES + 1),
                                            headers={**KEY, "X-Request-ID": "r413", "content-type": "image/jpeg"}),
        (401, "unauthorized"): httpx.post(f"{served}/classify", content=b"x", headers={"X-Request-ID": "r401"}),
        (404, "model_not_found"): httpx.get(f"{served}/v2/models/nothing", headers={**KEY, "X-Request-ID": "rv2"}),
        (200, "CORS preflight"): httpx.options(f"{served}/classify", headers={**preflight, "X-Request-ID": "rcors"}),
    }
    for (status, what), response in answers.items():
        assert response.status_code == status, (what, response.text)
        assert request_id(response) == response.request.headers["x-request-id"], what
    allowed = answers[200, "CORS preflight"].headers["access-control-allow-headers"].lower()
    assert "x-request-id" in allowed
    exposed = httpx.get(f"{served}/healthz", headers={"Origin": APP_ORIGIN}).headers["access-control-expose-headers"]
    assert "x-request-id" in exposed.lower()  # and read the answer's


def test_the_admission_gates_503_carries_the_id(served):
    admission = served.app.state.service.admission
    full = admission.capacity
    admission.admitted += full  # as if that many images were in progress: the gate refuses before routing
    try:
        refused = httpx.post(f"{served}/classify", content=b"x",
                             headers={**KEY, "X-Request-ID": "r503", "content-type": "image/jpeg"})
    finally:
        admission.admitted -= full
    assert (refused.status_code, refused.json()["error"]["code"]) == (503, "queue_full")
    assert request_id(refused) == "r503"


def test_the_unexpected_error_handlers_500_carries_the_id_and_its_log_line_names_it(served, caplog):
    """Starlette sends that 500 outside every middleware: the handler takes the id from the scope."""
    with caplog.at_level(logging.ERROR, logger="convnext.service"):
        given = httpx.get(f"{served}/bug", headers={**KEY, "X-Request-ID": "r500"})
        fresh = httpx.get(f"{served}/bug", headers=KEY)
    assert (given.status_code, given.json()["error"]["code"]) == (500, "internal_error")
    assert request_id(given) == "r500" and FRESH_ID.fullmatch(request_id(fresh))
    assert given.headers.get_list("x-content-type-options") == ["nosniff"]
    lines = [r.getMessage() for r in caplog.records if r.name == "convnext.service"]
    assert [line for line in lines if "r500" in line] == ["request r500 failed with KeyError: a bug (the traceback "
                                                          "follows)"]
    assert any(request_id(fresh) in line and "KeyError" in line for line in lines)


def test_the_servers_400_to_a_body_that_does_not_parse_carries_the_id_and_is_counted_and_logged_as_400(served):
    """The server writes that 400 itself, outside the app, while the app has the request: the answer carries the
    request's id, and the app's middleware counts and logs the 400 the client got (it counted its own 499)."""
    counted = 'convnext_requests_total{method="POST",route="/classify",status="400"}'
    before = metric(served, counted)
    with access_lines(access_formatter()) as lines:
        address = urlsplit(str(served))
        with socket.create_connection((address.hostname, address.port), timeout=10) as connection:
            connection.sendall(b"POST /classify HTTP/1.1\r\nHost: x\r\nX-API-Key: " + API_KEY.encode() +
                               b"\r\nContent-Type: image/jpeg\r\nTransfer-Encoding: chunked\r\n"
                               b"X-Request-ID: rbadchunk\r\n\r\nzz\r\n")  # "zz": no chunk size
            answer = b""
            while chunk := connection.recv(65536):  # the server closes after its answer
                answer += chunk
        deadline = time.monotonic() + 10
        while metric(served, counted) == before and time.monotonic() < deadline:  # the app's request ends after
            time.sleep(0.05)
        ACCESS_LOG.flush()
    head = answer.partition(b"\r\n\r\n")[0].decode("latin-1").split("\r\n")
    assert head[0] == "HTTP/1.1 400 Bad Request"
    assert [line for line in head if line.lower().startswith("x-request-id:")] == ["x-request-id: rbadchunk"]
    assert metric(served, counted) == before + 1
    logged = [line for line in lines if "rbadchunk" in line]
    assert len(logged) == 1 and logged[0].endswith('"POST /classify HTTP/1.1" 400 Bad Request rbadchunk'), lines


def access_formatter() -> logging.Formatter:
    """The access formatter `python -m service` configures (service/server.py's log_config), built as dictConfig
    builds it."""
    config = dict(log_config("info")["formatters"]["access"], use_colors=False)
    return logging.config.DictConfigurator({}).configure_formatter(config)  # type: ignore[attr-defined]


def test_the_access_line_ends_with_the_id_and_a_line_without_one_with_a_dash():
    formatter = access_formatter()
    with access_lines(formatter) as lines:
        log = AccessLog()
        scope = {"type": "http", "method": "GET", "path": "/healthz", "query_string": b"", "http_version": "1.1",
                 "client": ("127.0.0.1", 5000), "headers": [], REQUEST_ID_SCOPE_KEY: "abc123"}
        log.record(scope, 200)  # a request the app answered: RequestMetricsMiddleware left its id in the scope
        log.record({k: v for k, v in scope.items() if k != REQUEST_ID_SCOPE_KEY}, 503)  # one the server refused itself
        log.flush()
        LOGGER.info('%s - "%s %s HTTP/%s" %d', "127.0.0.1:1", "GET", "/", "1.1", 200)  # a record without the id
    assert isinstance(formatter, AccessLineFormatter)
    assert lines[0].endswith('127.0.0.1:5000 - "GET /healthz HTTP/1.1" 200 OK abc123'), lines
    assert lines[1].endswith('127.0.0.1:5000 - "GET /healthz HTTP/1.1" 503 Service Unavailable -')
    assert lines[2].endswith('127.0.0.1:1 - "GET / HTTP/1.1" 200 OK -')


def test_a_quote_in_the_query_string_cannot_end_the_access_lines_request_field():
    """The path is %-escaped by uvicorn, the query string not: a client's '"' ended the quoted request field early
    (`"GET /healthz?a=" 200 OK fake" 200`), so a log parser read what the client wrote as fields."""
    with access_lines(access_formatter()) as lines:
        log = AccessLog()
        log.record({"type": "http", "method": "GET", "path": "/healthz", "query_string": b'a=" 200 OK x',
                    "http_version": "1.1", "client": ("127.0.0.1", 5000), "headers": []}, 200)
        log.flush()
    assert lines[0].endswith('127.0.0.1:5000 - "GET /healthz?a=%22 200 OK x HTTP/1.1" 200 OK -'), lines


def grpc_call(served, method: str, request: bytes, metadata=()) -> tuple[grpc.StatusCode, dict]:
    """One unary call: its status code and trailing metadata."""
    with grpc.insecure_channel(grpc_address(served)) as channel:
        call = channel.unary_unary(f"/inference.GRPCInferenceService/{method}")
        try:
            _, answered = call.with_call(request, metadata=metadata, timeout=30)
        except grpc.RpcError as err:
            return err.code(), dict(err.trailing_metadata() or ())
        return answered.code(), dict(answered.trailing_metadata() or ())


GRPC_KEY = (("x-api-key", API_KEY),)


def test_grpc_answers_carry_the_calls_id_in_their_trailing_metadata(served):
    code, trailers = grpc_call(served, "ModelInfer", infer_message(1), (*GRPC_KEY, ("x-request-id", CLIENT_ID)))
    assert (code, trailers["x-request-id"]) == (grpc.StatusCode.OK, CLIENT_ID)
    code, trailers = grpc_call(served, "ServerLive", b"", (("x-request-id", "live-1"),))
    assert (code, trailers["x-request-id"]) == (grpc.StatusCode.OK, "live-1")
    code, trailers = grpc_call(served, "ModelMetadata", pb.ModelMetadataRequest(name="atto").SerializeToString(),
                               GRPC_KEY)
    assert code == grpc.StatusCode.OK and FRESH_ID.fullmatch(trailers["x-request-id"])
    code, trailers = grpc_call(served, "ServerLive", b"", (("x-request-id", "two words"),))
    assert FRESH_ID.fullmatch(trailers["x-request-id"])
    code, trailers = grpc_call(served, "ModelInfer", infer_message(1), (("x-request-id", "no-key"),))
    assert (code, trailers[ERROR_CODE_KEY], trailers["x-request-id"]) == (
        grpc.StatusCode.UNAUTHENTICATED, "unauthorized", "no-key")


def test_a_grpc_refusal_carries_the_id_beside_its_retry_pushback(served):
    calls = served.app.state.service.grpc_calls
    limit, calls.limit = calls.limit, 0  # every call but a health check is past max_connections
    try:
        code, trailers = grpc_call(served, "ModelInfer", infer_message(1), (*GRPC_KEY, ("x-request-id", "busy-1")))
    finally:
        calls.limit = limit
    assert code == grpc.StatusCode.UNAVAILABLE
    assert trailers[ERROR_CODE_KEY] == "too_many_connections" and trailers[RETRY_PUSHBACK_KEY] == "1000"
    assert trailers["x-request-id"] == "busy-1"

