"""The metrics count what happened, where the server answers a request itself, a decode outlives its request, a kept-
alive connection idles, a gRPC method does not exist, or nothing has happened yet (a black-box check of every metric
under a mixed load found these; the rest agreed with the client's own tally)."""
from __future__ import annotations

import io
import json
import re
import socket
import time
from pathlib import Path
from urllib.parse import urlsplit

import grpc
import httpx
import pytest
from PIL import Image

from service import batcher
from service.grpc_server import SERVICE_NAME
from service.model_manager import ENGINE_BROKEN_REASONS, RELOAD_RESULTS
from tests.service.conftest import free_port, metric
from tests.service.test_grpc import grpc_address

REJECTED = "convnext_rejected_total"


@pytest.fixture(scope="module")
def served(model_repository, launch):
    with launch(model_repository, grpc_port=free_port(), header_timeout_s=1.0, warmup_runs=0) as url:
        yield url


def raw_exchange(url: str, request: bytes) -> bytes:
    """`request` written as is on a new connection; everything the server sends until it closes."""
    address = urlsplit(str(url))
    with socket.create_connection((address.hostname, address.port), timeout=10) as connection:
        connection.sendall(request)
        answer = b""
        while chunk := connection.recv(65536):
            answer += chunk
    return answer


def wait_for(read, expected: float, timeout_s: float = 10) -> float:
    """`read()` once it equals `expected`, or its last value after timeout_s (the app's request ends after the
    server's answer)."""
    deadline = time.monotonic() + timeout_s
    while (value := read()) != expected and time.monotonic() < deadline:
        time.sleep(0.05)
    return value


def jpeg_bytes(photo: Path, size: tuple[int, int] = (96, 72)) -> bytes:
    buffer = io.BytesIO()
    Image.open(photo).convert("RGB").resize(size).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


@pytest.mark.parametrize("path", ["/classify", "/v2/models/atto_image/infer"])
def test_a_body_that_does_not_parse_is_one_refusal_in_the_body_its_path_speaks(served, path):
    """The server's 400 to a chunked body that does not parse is counted once (bad_request); the app's 499 to the
    closed connection was counted too (client_disconnected). On a /v2 path the answer is the protocol's error body."""
    before = metric(served, REJECTED)
    disconnected = f'{REJECTED}{{reason="client_disconnected"}}'
    disconnected_before = metric(served, disconnected)
    counted = f'convnext_requests_total{{method="POST",route="{path.replace("atto_image", "{name}")}",status="400"}}'
    requests_before = metric(served, counted)
    answer = raw_exchange(served, f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/octet-stream\r\n"
                          "Transfer-Encoding: chunked\r\n\r\nzz\r\n".encode())  # "zz": no chunk size
    assert wait_for(lambda: metric(served, counted), requests_before + 1) == requests_before + 1
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400 Bad Request")
    error = json.loads(body)
    if path.startswith("/v2"):
        assert error["code"] == "bad_request" and isinstance(error["error"], str)
    else:
        assert error["error"]["code"] == "bad_request"
    assert metric(served, REJECTED) == before + 1
    assert metric(served, disconnected) == disconnected_before


def test_a_head_refused_on_a_v2_path_gets_the_protocols_error_body(served):
    """The server's own 431 to a head over 64 KiB, before any app saw it: on a /v2 path, {"error": message, "code"}."""
    answer = raw_exchange(served, b"GET /v2/health/ready HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 70_000 + b"\r\n")
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 431 ")
    assert json.loads(body)["code"] == "header_too_large" and isinstance(json.loads(body)["error"], str)


def test_images_the_server_answered_400_are_not_counted_as_classified(served, real_photos):
    """A whole /classify request followed by bytes that are not HTTP: the server answers 400 and closes, so the app's
    200 (its batch may well run) never reaches the client: its image is not in convnext_images_total."""
    images_before = metric(served, "convnext_images_total")
    counted = 'convnext_requests_total{method="POST",route="/classify",status="400"}'
    requests_before = metric(served, counted)
    image = jpeg_bytes(real_photos[0])
    address = urlsplit(str(served))
    with socket.create_connection((address.hostname, address.port), timeout=10) as connection:
        connection.sendall(b"POST /classify HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\n"
                           b"Content-Length: %d\r\n\r\n%s\x00\x01 not http\r\n\r\n" % (len(image), image))
        assert connection.recv(65536).startswith(b"HTTP/1.1 400 Bad Request")
        # The client stays (the server's close lingers): the app's request runs to its end, its 200 going nowhere.
        assert wait_for(lambda: metric(served, counted), requests_before + 1) == requests_before + 1
    assert httpx.post(f"{served}/classify", content=image, headers={"content-type": "image/jpeg"}).status_code == 200
    assert metric(served, "convnext_images_total") == images_before + 1  # the second request's image alone


def test_a_decode_its_request_stopped_waiting_for_is_still_observed(launch, model_repository, real_photos):
    """convnext_preprocess_seconds is observed in the decode thread: a 12-MP decode (~100 ms) that outlives its
    request's 20 ms deadline is counted once it ends (it was not: the request's task was gone by then)."""
    with launch(model_repository, request_timeout_ms=20, warmup_runs=0) as url:
        before = metric(url, "convnext_preprocess_seconds_count")
        answer = httpx.post(f"{url}/classify", content=jpeg_bytes(real_photos[0], (4000, 3000)),
                            headers={"content-type": "image/jpeg"}, timeout=30)
        assert answer.status_code == 504, answer.text
        assert wait_for(lambda: metric(url, "convnext_preprocess_seconds_count"), before + 1) == before + 1


def test_an_idle_kept_alive_connection_closed_at_the_header_timeout_is_no_refusal(served):
    """header_timeout_s (1 s here) under timeout_keep_alive_s (5 s): a connection idle after its answer is closed at
    the header timeout, and not counted as a refused request head; one that never sent a request is."""
    refused = f'{REJECTED}{{reason="header_timeout"}}'
    before = metric(served, refused)
    address = urlsplit(str(served))
    with socket.create_connection((address.hostname, address.port), timeout=10) as connection:
        connection.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        answer = b""
        while not re.search(rb"content-length: (\d+)\r\n.*\r\n\r\n", answer, re.I | re.S):
            answer += connection.recv(65536)
        length = int(re.search(rb"content-length: (\d+)", answer, re.I).group(1))
        while len(answer.partition(b"\r\n\r\n")[2]) < length:
            answer += connection.recv(65536)
        assert answer.startswith(b"HTTP/1.1 200 OK")
        connection.settimeout(5)
        assert connection.recv(65536) == b""  # closed by the server after 1 s idle
    assert metric(served, refused) == before
    with socket.create_connection((address.hostname, address.port), timeout=10) as connection:
        connection.settimeout(5)
        assert connection.recv(65536) == b""
    assert wait_for(lambda: metric(served, refused), before + 1) == before + 1


def test_a_grpc_method_the_service_does_not_have_is_counted_unmatched(served):
    """A protocol RPC this service leaves out (ModelConfig) and another service's method: grpc answers UNIMPLEMENTED,
    counted under method "unmatched" (as HTTP counts an unknown path), never under the client's method name."""
    counted = 'convnext_grpc_requests_total{code="UNIMPLEMENTED",method="unmatched"}'
    before = metric(served, counted)
    with grpc.insecure_channel(grpc_address(served)) as channel:
        for method in (f"/{SERVICE_NAME}/ModelConfig", "/other.Service/Anything"):
            call = channel.unary_unary(method, request_serializer=lambda b: b, response_deserializer=lambda b: b)
            with pytest.raises(grpc.RpcError) as raised:
                call(b"", timeout=10)
            assert raised.value.code() == grpc.StatusCode.UNIMPLEMENTED
    assert metric(served, counted) == before + 2
    assert metric(served, 'convnext_grpc_request_duration_seconds_count{code="UNIMPLEMENTED",method="unmatched"}') \
        == before + 2
    assert "Anything" not in httpx.get(f"{served}/metrics").text


def test_every_reason_and_result_series_exists_before_its_first_event(served):
    """convnext_engine_restarts_total and convnext_model_reloads_total read 0, not empty, on a fresh service (as
    convnext_inference_seconds does), and the reasons listed are the batcher's own."""
    scrape = httpx.get(f"{served}/metrics").text
    for reason in ENGINE_BROKEN_REASONS:
        assert f'convnext_engine_restarts_total{{reason="{reason}"}} 0.0' in scrape
    for result in RELOAD_RESULTS:
        assert f'convnext_model_reloads_total{{result="{result}"}} 0.0' in scrape
    detached = re.findall(r'_detach\(\w+, "(\w+)"', Path(batcher.__file__).read_text())
    assert set(detached) == set(ENGINE_BROKEN_REASONS)
