"""Connection-level limits over raw sockets: slow headers, stalled bodies, too many connections, files per request,
and a client that leaves before its answer."""
from __future__ import annotations

import gzip
import http.client
import json
import socket
import threading
import time
from urllib.parse import urlsplit

import httpx
import pytest

from runtime.engines.onnxruntime import OnnxRuntimeEngine
from tests.service.conftest import metric
from tests.service.test_faults import factory


def connect(url: str) -> socket.socket:
    parts = urlsplit(url)
    return socket.create_connection((parts.hostname, parts.port), timeout=10)


def read_response(sock: socket.socket) -> tuple[int, dict, bytes]:
    response = http.client.HTTPResponse(sock)
    response.begin()
    return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()


def closed_by_server(sock: socket.socket, trickle: bytes = b"", deadline_s: float = 15) -> bool:
    """Keep sending `trickle` (a header byte at a time, as slowloris does) until the server closes the socket."""
    sock.settimeout(0.1)
    give_up = time.monotonic() + deadline_s
    while time.monotonic() < give_up:
        try:
            if trickle:
                sock.sendall(trickle)
            if sock.recv(1024) == b"":
                return True
        except TimeoutError:
            continue
        except (ConnectionResetError, BrokenPipeError):
            return True
    return False


@pytest.fixture(scope="module")
def strict_url(model_repository, launch):
    """2 s timeouts: short enough for the tests that wait for them, long enough that a pause of the whole test process
    (its servers run in threads of it: a garbage collection, CPU steal on CI) cannot time out the uploads and heads
    meant to succeed (after a pause longer than a timer, asyncio runs the timer before the read of what arrived)."""
    with launch(model_repository, header_timeout_s=2.0, body_timeout_s=2.0, max_files_per_request=3) as url:
        yield url


def test_slow_request_headers_are_cut_off_while_others_are_served(strict_url):
    stalled = connect(strict_url)
    stalled.sendall(b"POST /classify HTTP/1.1\r\nHost: test\r\n")  # half a request head, then nothing
    trickling = connect(strict_url)
    trickling.sendall(b"GET /healthz HTTP/1.1\r\nHost: test\r\n")
    assert httpx.get(f"{strict_url}/healthz").status_code == 200  # another connection is served meanwhile
    assert closed_by_server(stalled)
    assert closed_by_server(trickling, trickle=b"X")  # bytes arriving do not keep a head open forever
    assert metric(strict_url, 'convnext_rejected_total{reason="header_timeout"}') >= 2
    stalled.close()
    trickling.close()


def test_a_request_head_over_64_kib_is_refused_with_431_before_it_costs_the_event_loop(strict_url, real_photos):
    """A 1 MiB URL sent in 4 KiB writes: uvicorn's httptools protocol joins the URL piece by piece (quadratic: ~1 s of
    event loop per 2 MB before any route or key check). The server answers 431 and closes once the head passes
    64 KiB; a body of any size after a normal head is not counted against it."""
    sock = connect(strict_url)
    sock.settimeout(10)
    answer = b""
    try:
        sock.sendall(b"GET /")
        for _ in range(256):  # up to 1 MiB of URL
            sock.sendall(b"a" * 4096)
            time.sleep(0.001)
    except OSError:  # the server closed the connection while we were still sending
        pass
    try:
        while chunk := sock.recv(65536):
            answer += chunk
    except OSError:
        pass
    sock.close()
    assert answer.startswith(b"HTTP/1.1 431 "), answer[:200]
    assert json.loads(answer.split(b"\r\n\r\n", 1)[1])["error"]["code"] == "header_too_large"
    assert metric(strict_url, 'convnext_rejected_total{reason="header_too_large"}') >= 1
    big = real_photos[0].read_bytes() * 3  # ~0.5 MB in one go after a small head: answered, not 431
    response = httpx.post(f"{strict_url}/classify", content=big, headers={"content-type": "image/jpeg"})
    assert response.status_code != 431 and response.status_code < 500


def test_keep_alive_connection_gets_the_same_header_timeout_for_its_next_request(strict_url):
    sock = connect(strict_url)
    sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: test\r\n\r\n")
    assert read_response(sock)[0] == 200
    sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: te")  # uvicorn's keep-alive timer stops at this first byte
    assert closed_by_server(sock, trickle=b"s")
    sock.close()


def test_a_body_trickled_under_the_chunk_timeout_still_ends_at_the_body_deadline(model_repository, launch,
                                                                                 real_photos):
    """A byte every 0.1 s never trips the 1 s chunk timeout: without a deadline for the whole body it would hold
    its connection and buffer for as long as it likes (512 such clients lock everyone out). The 0.9 s between a byte
    and the chunk timeout is room for a pause of the test process, whose server thread would otherwise answer 408
    for the chunk instead of for the deadline."""
    jpeg = real_photos[0].read_bytes()
    with launch(model_repository, body_timeout_s=1.0, body_deadline_s=2.5) as url:
        sock = connect(url)
        sock.sendall(b"POST /classify HTTP/1.1\r\nHost: test\r\nContent-Type: image/jpeg\r\n"
                     b"Content-Length: %d\r\n\r\n" % len(jpeg))
        started = time.monotonic()
        sock.settimeout(0.1)
        answer = b""
        for byte in jpeg[:100]:
            try:
                sock.sendall(bytes([byte]))
                answer += sock.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                break
            if answer:
                break
        elapsed = time.monotonic() - started
        sock.close()
        assert answer.startswith(b"HTTP/1.1 408"), answer[:100]
        # 100 bytes take 10 s or more: an answer well before them is the deadline's
        assert b"did not arrive within 2.5 s" in answer and elapsed < 8


def test_admin_reload_takes_only_a_small_json_body(strict_url):
    """A bodyless or form POST is what any web page can send cross-site without a preflight (415); a large body
    is refused before it is buffered (413)."""
    for headers in ({}, {"content-type": "application/x-www-form-urlencoded"}, {"content-type": "text/plain"}):
        refused = httpx.post(f"{strict_url}/admin/reload", headers=headers)
        assert refused.status_code == 415 and refused.json()["error"]["code"] == "unsupported_media_type", headers
    huge = httpx.post(f"{strict_url}/admin/reload", content=b" " * 2_000_000,
                      headers={"content-type": "application/json"})
    assert huge.status_code == 413 and huge.json()["error"]["code"] == "body_too_large"
    latest = httpx.post(f"{strict_url}/admin/reload", json={}, timeout=60)
    assert latest.status_code == 200 and latest.json()["model"]["name"] == "atto"


def test_a_body_that_stalls_gets_408_and_never_reaches_the_batcher(strict_url, real_photos):
    jpeg = real_photos[0].read_bytes()
    images_before = metric(strict_url, "convnext_images_total")
    sock = connect(strict_url)
    sock.sendall(b"POST /classify HTTP/1.1\r\nHost: test\r\nContent-Type: image/jpeg\r\n"
                 b"Content-Length: %d\r\n\r\n" % len(jpeg) + jpeg[: len(jpeg) // 2])
    status, headers, body = read_response(sock)
    assert status == 408
    assert json.loads(body)["error"]["code"] == "body_timeout"
    assert closed_by_server(sock)
    sock.close()
    assert metric(strict_url, "convnext_images_total") == images_before
    assert httpx.post(f"{strict_url}/classify", content=jpeg, headers={"content-type": "image/jpeg"}).status_code == 200


SLOW_SENT, SLOW_DECLARED = 900 * 1024, 1024 * 1024
BUDGET_LIMITS = dict(max_body_bytes=1024 * 1024, max_buffered_body_bytes=2048 * 1024, body_timeout_s=10)


def slow_upload(url: str) -> socket.socket:
    """900 KiB of a 1 MiB /classify body, then a pause: held by the route reading it (finish_upload ends it)."""
    held = metric(url, "convnext_buffered_body_bytes")
    slow = connect(url)
    slow.sendall(b"POST /classify HTTP/1.1\r\nHost: test\r\nContent-Type: image/jpeg\r\n"
                 b"Content-Length: %d\r\n\r\n" % SLOW_DECLARED + bytes(SLOW_SENT))
    deadline = time.monotonic() + 10
    while metric(url, "convnext_buffered_body_bytes") < held + SLOW_SENT and time.monotonic() < deadline:
        time.sleep(0.02)
    assert metric(url, "convnext_buffered_body_bytes") == held + SLOW_SENT
    return slow


def finish_upload(slow: socket.socket) -> None:
    """The rest of a slow_upload: answered (400, zeros are no image), its room given back."""
    slow.sendall(bytes(SLOW_DECLARED - SLOW_SENT))
    assert read_response(slow)[0] == 400
    slow.close()


def test_bodies_held_at_once_stay_within_max_buffered_body_bytes_and_their_room_comes_back(model_repository, launch,
                                                                                            real_photos):
    """max_connections x max_body_bytes can exceed the container's memory: bodies together are bounded too, with
    what they become in memory (a gzip body decompressed, a form's files beside the raw body)."""
    photo = real_photos[0].read_bytes()
    upload = photo + bytes(700 * 1024 - len(photo))  # 700 KiB: the JPEG, then zeros its decoder stops before
    gzipped = {"content-type": "image/jpeg", "content-encoding": "gzip"}
    with launch(model_repository, **BUDGET_LIMITS) as url:
        slow = [slow_upload(url), slow_upload(url)]  # 1800 KiB of 2 MiB held
        refused = httpx.post(f"{url}/classify", content=upload, headers={"content-type": "image/jpeg"})
        assert refused.status_code == 503 and refused.headers["retry-after"] == "1", refused.text
        assert refused.json()["error"]["code"] == "body_buffer_full"
        # ~1 KB on the wire, 700 KiB once decompressed: counted as that
        inflated = httpx.post(f"{url}/classify", content=gzip.compress(upload), headers=gzipped)
        assert inflated.status_code == 503 and inflated.json()["error"]["code"] == "body_buffer_full", inflated.text
        assert metric(url, 'convnext_rejected_total{reason="body_buffer_full"}') == 2
        finish_upload(slow.pop())
        files = {"files": ("photo.jpg", upload[:600 * 1024], "image/jpeg")}  # 600 KiB on the wire and 600 read
        doubled = httpx.post(f"{url}/classify", files=files)
        assert doubled.status_code == 503 and doubled.json()["error"]["code"] == "body_buffer_full", doubled.text
        finish_upload(slow.pop())
        assert metric(url, "convnext_buffered_body_bytes") == 0
        for answered in (httpx.post(f"{url}/classify", content=upload, headers={"content-type": "image/jpeg"}),
                         httpx.post(f"{url}/classify", content=gzip.compress(upload), headers=gzipped),
                         httpx.post(f"{url}/classify", files=files)):
            assert answered.status_code == 200, answered.text
        assert metric(url, "convnext_buffered_body_bytes") == 0


def test_connections_beyond_the_limit_get_json_503_then_the_service_serves_again(model_repository, launch,
                                                                                real_photos):
    with launch(model_repository, max_connections=2) as url:
        check_connection_limit(url, real_photos[0].read_bytes())


def check_connection_limit(strict_url: str, jpeg: bytes) -> None:
    held = [connect(strict_url) for _ in range(2)]
    for sock in held:  # a full request each, so the server has surely accepted both connections
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: test\r\n\r\n")
        assert read_response(sock)[0] == 200
    refused = httpx.post(f"{strict_url}/classify", content=jpeg, headers={"content-type": "image/jpeg"})
    assert refused.status_code == 503
    assert refused.headers["retry-after"] == "1"
    assert refused.json()["error"]["code"] == "too_many_connections"
    # Health checks and scrapes still answer: a liveness probe refused under load would restart a healthy server.
    for path in ("/healthz", "/readyz", "/metrics", "/v2/health/live", "/v2/health/ready"):
        assert httpx.get(f"{strict_url}{path}").status_code == 200, path
    # Refused before routing, still in the request metrics (the dashboard's 5xx ratio): under no route, as a 5xx.
    assert metric(strict_url, 'convnext_requests_total{method="POST",route="unmatched",status="503"}') >= 1
    assert metric(strict_url, 'convnext_request_duration_seconds_count{route="unmatched",status_class="5xx"}') >= 1
    for sock in held:
        sock.close()
    deadline = time.monotonic() + 10
    while (status := httpx.get(f"{strict_url}/models").status_code) != 200 and time.monotonic() < deadline:
        time.sleep(0.05)  # the server notices the closed connections on its next loop turn
    assert status == 200
    assert httpx.post(f"{strict_url}/classify", content=jpeg, headers={"content-type": "image/jpeg"}).status_code == 200


def test_exactly_max_files_per_request_is_accepted_one_more_is_413(strict_url, real_photos):
    files = [("files", (p.name, p.read_bytes(), "image/jpeg")) for p in real_photos[:4]]
    accepted = httpx.post(f"{strict_url}/classify", files=files[:3], timeout=30)
    assert accepted.status_code == 200
    assert [r["filename"] for r in accepted.json()["results"]] == [p.name for p in real_photos[:3]]
    refused = httpx.post(f"{strict_url}/classify", files=files, timeout=30)
    assert refused.status_code == 413
    assert refused.json()["error"]["code"] == "too_many_files"


class Gate:
    """The real ONNX Runtime engine (`factory`), each batch waiting while the gate is closed until the test opens it.

    Open at first, so the check batch the service runs when it loads goes through. One Gate per test: its events
    are that test's own, so a gate a failed test left closed, or a late Timer opening one, reaches no other server.
    """

    def __init__(self):
        self.open, self.batch_started = threading.Event(), threading.Event()
        self.open.set()
        gate = self

        class GatedEngine(OnnxRuntimeEngine):
            def run(self, batch):
                gate.batch_started.set()
                gate.open.wait(30)
                return super().run(batch)

        self.factory = factory(GatedEngine)

    def close(self) -> None:
        """From here on each batch waits for open.set(); batch_started tells when the next one reached the engine."""
        self.open.clear()
        self.batch_started.clear()


def test_an_image_that_waited_past_its_deadline_is_in_the_queue_wait_histogram(model_repository, real_photos, launch):
    """The worst waits, those ending in 504 behind a stalled engine, are observed when the request gives up (they
    were never observed: only an image whose batch started was)."""
    jpeg = real_photos[0].read_bytes()
    gate = Gate()
    with launch(model_repository, gate.factory, max_batch_size=1, warmup_runs=0, request_timeout_ms=1500) as url:
        gate.close()
        first = threading.Thread(target=httpx.post, args=(f"{url}/classify",),
                                 kwargs=dict(content=jpeg, headers={"content-type": "image/jpeg"}, timeout=30))
        first.start()
        try:
            assert gate.batch_started.wait(20)  # the first request holds the engine
            waits_before = metric(url, "convnext_queue_wait_seconds_count")
            seconds_before = metric(url, "convnext_queue_wait_seconds_sum")
            second = httpx.post(f"{url}/classify", content=jpeg, headers={"content-type": "image/jpeg"}, timeout=30)
            assert second.status_code == 504 and second.json()["error"]["code"] == "deadline"
            # Before the engine takes another batch: observed when its request stopped waiting.
            assert metric(url, "convnext_queue_wait_seconds_count") == waits_before + 1
            assert metric(url, "convnext_queue_wait_seconds_sum") - seconds_before >= 1.0
        finally:
            gate.open.set()
            first.join()
        time.sleep(0.3)  # the batcher drops the 504's place in the queue: not observed a second time
        assert metric(url, "convnext_queue_wait_seconds_count") == waits_before + 1


def test_a_client_that_leaves_is_counted_and_its_queued_images_never_run(model_repository, real_photos, launch):
    jpeg = real_photos[0].read_bytes()
    gate = Gate()
    with launch(model_repository, gate.factory, max_batch_size=1, warmup_runs=0) as url:
        gate.close()
        first = threading.Thread(target=httpx.post, args=(f"{url}/classify",),
                                 kwargs=dict(content=jpeg, headers={"content-type": "image/jpeg"}, timeout=30))
        first.start()
        assert gate.batch_started.wait(20)  # the first request holds the engine
        body = b"".join(b"--b\r\nContent-Disposition: form-data; name=files; filename=%d.jpg\r\n"
                        b"Content-Type: image/jpeg\r\n\r\n" % i + jpeg + b"\r\n" for i in range(4)) + b"--b--\r\n"
        leaving = connect(url)
        leaving.sendall(b"POST /classify HTTP/1.1\r\nHost: test\r\nContent-Type: multipart/form-data; boundary=b\r\n"
                        b"Content-Length: %d\r\n\r\n" % len(body) + body)
        wait_for_metric(url, "convnext_queue_depth", 4)
        leaving.close()  # while its four images wait behind the first request
        wait_for_metric(url, 'convnext_rejected_total{reason="client_disconnected"}', 1)
        gate.open.set()
        first.join()
        second = httpx.post(f"{url}/classify", content=jpeg, headers={"content-type": "image/jpeg"}, timeout=30)
        assert second.status_code == 200  # the service keeps serving
        text = httpx.get(f"{url}/metrics").text
        assert 'convnext_rejected_total{reason="client_disconnected"} 1.0' in text
        assert metric(url, "convnext_images_total") == 2  # the first and the second request, none of the four


def wait_for_metric(url: str, name: str, at_least: float) -> None:
    deadline = time.monotonic() + 20
    while metric(url, name) < at_least:
        assert time.monotonic() < deadline, f"{name} never reached {at_least}"
        time.sleep(0.01)


@pytest.mark.parametrize("path", ["/healthz", "/classify"])
def test_a_head_over_64_kib_that_arrives_in_one_read_gets_431_too(strict_url, path):
    """The same limit when the whole head parses in one read (a 100 KB header in one write): answered 431 and closed,
    probes included; a head just under the limit is served."""
    for size, expected in ((100_000, 431), (60_000, 200)):
        answer = httpx.get(f"{strict_url}{path}", headers={"x-big": "a" * size}) if path == "/healthz" else \
            httpx.post(f"{strict_url}{path}", headers={"x-big": "a" * size, "content-type": "image/jpeg"},
                       content=b"")
        if expected == 431:
            assert answer.status_code == 431, answer.text
            assert answer.json()["error"]["code"] == "header_too_large"
            assert answer.headers["connection"] == "close"
        else:
            assert answer.status_code != 431, answer.text
    assert metric(strict_url, 'convnext_rejected_total{reason="header_too_large"}') >= 1
