"""An answer sent while the client is still uploading reaches it (lingering close), over a real socket to the real
server, with both of uvicorn's HTTP/1.1 protocols on both event loops.

Closed with the upload still arriving, the server's socket resets the connection, and a client that sends its whole
body before reading (http.client, requests) gets ECONNRESET or a broken pipe instead of the JSON error."""
from __future__ import annotations

import asyncio
import http.client
import json
import logging
import socket
import threading
import time
from contextlib import ExitStack, contextmanager
from urllib.parse import urlsplit

import httpx
import pytest
from uvicorn.protocols.http.h11_impl import H11Protocol
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from service import lingering_close, server
from service.access_log import ACCESS_LOG
from tests.service.conftest import metric
from tests.service.test_admission_gate import fill_to_capacity
from tests.service.test_faults import Hold
from tests.service.test_limits import read_response

UPLOAD_BYTES = 16 * 1024 * 1024  # 16 times max_body_bytes: far more than the socket buffers hold
# body_timeout_s: 2 s, not less: the uploads that must go through (a 1 MiB streamed body, the keep-alive test's JPEGs)
# would get 408 from a pause of the whole test process (its servers run in threads of it: a garbage collection, CPU
# steal on CI) longer than it between two chunks; the stall test waits for it once per stack.
LIMITS = dict(max_body_bytes=1024 * 1024, max_buffered_body_bytes=2 * 1024 * 1024, body_timeout_s=2.0)
STACKS = {"httptools-uvloop": (HttpToolsProtocol, "uvloop"), "httptools-asyncio": (HttpToolsProtocol, "asyncio"),
          "h11-uvloop": (H11Protocol, "uvloop"), "h11-asyncio": (H11Protocol, "asyncio")}
uvicorn_config = server.uvicorn_config  # the real one, before any test swaps it


@pytest.fixture(scope="module", params=list(STACKS))
def stack(request) -> str:
    return request.param


@contextmanager
def serving(repository, launch, stack: str, **settings):
    """The live server (conftest's `serve`) on the given uvicorn protocol and event loop."""
    base, loop = STACKS[stack]

    def config_on_stack(app, settings, log_level="info"):
        config = uvicorn_config(app, settings, log_level)
        config.http = server.http_protocol(settings.header_timeout_s, app.state.metrics, settings.max_connections, base,
                                           access_log=settings.access_log)
        config.loop = loop
        return config

    with ExitStack() as running:
        with pytest.MonkeyPatch.context() as patch:  # only while the server is made
            patch.setattr(server, "uvicorn_config", config_on_stack)
            url = running.enter_context(launch(repository, **settings))
        yield url


@pytest.fixture(scope="module")
def edge_url(model_repository, launch, stack):
    with serving(model_repository, launch, stack, **LIMITS) as url:
        yield url


@pytest.fixture(scope="module")
def jpeg(real_photos) -> bytes:
    return real_photos[0].read_bytes()


def connection(url: str) -> http.client.HTTPConnection:
    parts = urlsplit(url)
    return http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)


def upload(url: str, path: str, body, headers: dict) -> tuple[int, dict, dict]:
    """As http.client (and requests over it) does: send the whole request, then read the answer."""
    client = connection(url)
    try:
        client.request("POST", path, body=body, headers=headers)
        response = client.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, json.loads(response.read())
    finally:
        client.close()


def raw_socket(url: str) -> socket.socket:
    parts = urlsplit(url)
    return socket.create_connection((parts.hostname, parts.port), timeout=30)


def upload_head(size: int, path: str = "/classify") -> bytes:
    return b"POST %s HTTP/1.1\r\nHost: test\r\nContent-Type: image/jpeg\r\nContent-Length: %d\r\n\r\n" % (
        path.encode(), size)


def answer_of(raw: bytes) -> tuple[int, dict]:
    head, _, body = raw.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)


def assert_serves(url: str, jpeg: bytes) -> None:
    """The process serves afterwards (polled: a connection the client has just closed may still be counted, 503,
    and a pause of this whole process, server thread included, over body_timeout_s between two chunks of the upload
    (a full garbage collection late in the suite, CPU steal on CI) answers 408; CI saw one at 0.5 s)."""
    deadline = time.monotonic() + 20
    while (status := httpx.post(f"{url}/classify", content=jpeg, headers={"content-type": "image/jpeg"},
                                timeout=30).status_code) in (503, 408) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert status == 200


class EndlessUpload:
    """A raw-socket client declaring a 1 GiB body and sending 64 KiB every few ms from a thread until told to stop
    or cut off by the server, while the test reads the answer from the same socket."""

    def __init__(self, url: str, path: str = "/classify"):
        self.sock = raw_socket(url)
        self.sock.sendall(upload_head(1 << 30, path))
        self.stop, self.cut_off = threading.Event(), threading.Event()
        self.thread = threading.Thread(target=self._send, daemon=True)
        self.thread.start()

    def _send(self) -> None:
        chunk = bytes(64 * 1024)
        while not self.stop.is_set():
            try:
                self.sock.sendall(chunk)
            except OSError:  # reset or broken pipe: the server has closed the socket
                self.cut_off.set()
                return
            time.sleep(0.005)

    def read_answer(self) -> tuple[int, dict]:
        """The whole answer, up to the server's FIN (it shuts its side once the answer is out)."""
        raw = b""
        while chunk := self.sock.recv(65536):
            raw += chunk
        return answer_of(raw)

    def close(self) -> None:
        self.stop.set()
        self.thread.join(10)
        self.sock.close()


@pytest.mark.parametrize(("path", "chunked", "status", "code"), [
    ("/classify", False, 413, "body_too_large"),  # Content-Length over the limit: answered before reading
    ("/classify", True, 413, "body_too_large"),  # no length: the streamed body crosses the limit
    ("/no-such-route", False, 404, "not_found"),  # any answer that does not read the body
], ids=["declared-413", "streamed-413", "unread-404"])
def test_a_client_that_sends_its_whole_body_first_reads_the_early_json_error(edge_url, jpeg, path, chunked, status,
                                                                            code):
    body = iter([bytes(256 * 1024)] * (UPLOAD_BYTES // (256 * 1024))) if chunked else bytes(UPLOAD_BYTES)
    answered, headers, error = upload(edge_url, path, body, {"Content-Type": "image/jpeg"})
    assert (answered, error["error"]["code"]) == (status, code), error
    assert headers["connection"] == "close"  # not kept alive: the rest of the body is never parsed as requests
    assert_serves(edge_url, jpeg)


def test_at_capacity_an_uploading_client_reads_the_gates_503(model_repository, launch, jpeg):
    """The admission gate refuses from the headers alone (service/admission.py); on uvicorn's default stack."""
    held = Hold()
    with launch(model_repository, held.factory, max_batch_size=1, queue_size=1, warmup_runs=0, **LIMITS) as url:
        held.start()  # from here on, batches wait for held.finish
        threads = fill_to_capacity(url, url.app, jpeg, {"content-type": "image/jpeg"})
        try:
            status, headers, error = upload(url, "/classify", bytes(UPLOAD_BYTES), {"Content-Type": "image/jpeg"})
        finally:
            held.finish(threads)
        assert (status, error["error"]["code"], headers["retry-after"]) == (503, "queue_full", "1")
        assert_serves(url, jpeg)


def test_a_client_that_stalls_then_sends_the_rest_reads_the_408(edge_url, jpeg):
    declared = LIMITS["max_body_bytes"]  # within the limit: read until it stalls
    sock = raw_socket(edge_url)
    sock.sendall(upload_head(declared) + bytes(1024))
    sock.recv(1, socket.MSG_PEEK)  # the 408 has arrived (body_timeout_s: 2 s) ...
    sock.sendall(bytes(declared - 1024))  # ... and the client, unaware, sends the rest of its body
    raw = b""
    while chunk := sock.recv(65536):
        raw += chunk
    sock.close()
    status, error = answer_of(raw)
    assert (status, error["error"]["code"]) == (408, "body_timeout")
    assert_serves(edge_url, jpeg)


def test_an_answer_after_the_whole_body_keeps_the_connection_alive(edge_url, jpeg):
    sock = raw_socket(edge_url)
    # Each request in one write: the 404's small body arrives with its head, all read when the route is not found.
    requests = (("/classify", jpeg, 200), ("/no-such-route", bytes(1024), 404), ("/classify", jpeg, 200))
    for path, body, status in requests:
        sock.sendall(upload_head(len(body), path) + body)
        answered, headers, _ = read_response(sock)
        assert (answered, headers.get("connection")) == (status, None), path
    sock.close()


def test_a_client_that_never_stops_sending_is_cut_off_at_the_lingering_bound(edge_url, jpeg, monkeypatch):
    monkeypatch.setattr(lingering_close, "LINGERING_TIME_S", 1.0)  # silence (2 s) never comes: the total bound ends it
    client = EndlessUpload(edge_url)
    try:
        status, error = client.read_answer()
        assert (status, error["error"]["code"]) == (413, "body_too_large")
        assert client.cut_off.wait(30), "the server lingered past its bound"
    finally:
        client.close()
    assert_serves(edge_url, jpeg)


def test_at_the_connection_limit_an_uploading_client_reads_the_503_and_lingering_counts(model_repository, launch,
                                                                                       stack, jpeg, monkeypatch):
    monkeypatch.setattr(lingering_close, "LINGERING_TIME_S", 60.0)  # here only the client's silence ends it
    # Silence: 4 s, not 2, so that a pause of the sending thread (or of the whole process, servers included) cannot
    # end the lingering before the test has seen it hold the place; the test then waits that long once per stack.
    monkeypatch.setattr(lingering_close, "LINGERING_TIMEOUT_S", 4.0)
    with serving(model_repository, launch, stack, max_connections=1, **LIMITS) as url:
        held = raw_socket(url)
        held.sendall(b"GET /healthz HTTP/1.1\r\nHost: test\r\n\r\n")  # a probe: always answered, then kept alive
        assert held.recv(65536).startswith(b"HTTP/1.1 200 ")
        status, headers, error = upload(url, "/classify", bytes(UPLOAD_BYTES), {"Content-Type": "image/jpeg"})
        assert (status, error["error"]["code"], headers["retry-after"]) == (503, "too_many_connections", "1")
        held.close()
        assert_serves(url, jpeg)

        # A probe path passes the limit whatever the count (the client just served may not be seen closed yet);
        # GET-only, it answers a POST at once (405), its body unread.
        client = EndlessUpload(url, "/healthz")
        try:
            status, error = client.read_answer()
            assert (status, error["error"]["code"]) == (405, "method_not_allowed")
            # Still sending, so still lingering: its connection holds the one place (a flood cannot get past it).
            assert httpx.get(f"{url}/models").json()["error"]["code"] == "too_many_connections"
            client.stop.set()
            client.thread.join(10)
            # Silent now: within LINGERING_TIMEOUT_S (4 s here) the server closes it and the place is free again.
            deadline = time.monotonic() + 20
            while httpx.get(f"{url}/models").status_code == 503 and time.monotonic() < deadline:
                time.sleep(0.1)
            assert httpx.get(f"{url}/models").status_code == 200
        finally:
            client.close()


def test_a_lingering_connection_delays_shutdown_no_longer_than_its_bound(model_repository, launch, stack,
                                                                         monkeypatch):
    monkeypatch.setattr(lingering_close, "LINGERING_TIME_S", 2.0)
    running = ExitStack()
    with running:
        url = running.enter_context(serving(model_repository, launch, stack, **LIMITS))
        client = EndlessUpload(url)
        try:
            assert client.read_answer()[0] == 413
            started = time.monotonic()
            running.close()  # uvicorn's graceful shutdown, as on SIGTERM (conftest's serve joins for up to 30 s)
            # Generous: a shutdown waiting on the lingering connection would reach uvicorn's 35 s graceful timeout.
            assert time.monotonic() - started < 20
            assert client.cut_off.wait(10)  # closed by the server at its bound while it still sent
        finally:
            client.close()


@pytest.mark.parametrize("loop_kind", ["asyncio", "uvloop"])
def test_writes_while_lingering_are_dropped_not_raised(loop_kind):
    """A request still running when its connection went lingering (uvicorn's own 400 to garbage pipelined behind it)
    writes its answer after the write side is shut: dropped, where the socket transport raises "Cannot call write()
    after write_eof()" into the app. Real transports on a real socket pair, both event loops."""
    import uvloop

    async def scenario() -> tuple[bytes, bool]:
        loop = asyncio.get_running_loop()
        ours, theirs = socket.socketpair()
        transport, _ = await loop.connect_accepted_socket(asyncio.Protocol, ours)
        lingering = lingering_close.LingeringTransport(transport, loop, lingering_close.LingeringConnections(None))
        lingering.write(b"answer")
        lingering.linger_on_close = True
        lingering.close()
        lingering.write(b"late")  # would raise without the guard
        lingering.writelines([b"late"])
        theirs.setblocking(False)
        received = b""
        while not received.endswith(b"answer"):
            try:
                received += theirs.recv(64)
            except BlockingIOError:
                await asyncio.sleep(0.01)
        is_lingering = lingering.lingering
        transport.abort()
        theirs.close()
        return received, is_lingering

    runner = uvloop.run if loop_kind == "uvloop" else asyncio.run
    assert runner(scenario()) == (b"answer", True)


def test_no_more_connections_linger_at_once_than_max_connections(model_repository, launch, stack, jpeg,
                                                                 monkeypatch):
    """A flood of early-refused uploads holds no more sockets open than the server would serve: with
    max_connections 1, one lingers while it sends; the next ones close at once (their clients cut off)."""
    monkeypatch.setattr(lingering_close, "LINGERING_TIME_S", 60.0)
    # Nor its silence (2 s by default): a pause of the first client's sending thread while the others connect.
    monkeypatch.setattr(lingering_close, "LINGERING_TIMEOUT_S", 30.0)
    with serving(model_repository, launch, stack, max_connections=1, **LIMITS) as url:
        first = EndlessUpload(url, "/healthz")  # a probe path passes the limit: answered 405, its body unread
        others: list[EndlessUpload] = []
        try:
            assert first.read_answer()[0] == 405  # lingering now: the server's one place to linger
            others = [EndlessUpload(url, "/healthz") for _ in range(3)]
            assert all(other.cut_off.wait(30) for other in others)  # no room: closed at once, unread data and all
            assert not first.cut_off.is_set()  # still lingering while it sends
        finally:
            for client in [first, *others]:
                client.close()
        assert_serves(url, jpeg)



def send_head(sock: socket.socket, head: bytes, write_bytes: int | None, then: bytes = b"") -> None:
    """`head` in one write, or in writes of `write_bytes` 2 ms apart, then `then`; a refusal mid-head (the answer
    already on its way) ends the sending."""
    step = write_bytes or len(head)
    try:
        for start in range(0, len(head), step):
            sock.sendall(head[start:start + step])
            if write_bytes:
                time.sleep(0.002)
        sock.sendall(then)
    except (BrokenPipeError, ConnectionResetError):
        pass


@pytest.mark.parametrize("header_bytes, status", [(40_000, 200), (100_000, 431)])
@pytest.mark.parametrize("write_bytes", [4096, None])
def test_a_head_up_to_64_kib_is_served_and_one_over_it_gets_431_on_every_stack(edge_url, jpeg, header_bytes, status,
                                                                             write_bytes):
    """In one write or in 4 KiB writes: h11 refuses an incomplete head over its own 16 KiB default with a bare 400
    unless told the service's limit."""
    head = upload_head(len(jpeg)).replace(b"\r\n\r\n", b"\r\nX-Padding: %s\r\n\r\n" % (b"a" * header_bytes))
    with raw_socket(edge_url) as sock:
        send_head(sock, head, write_bytes, then=jpeg)
        answer_status, _, body = read_response(sock)
    assert answer_status == status, body[:300]


@contextmanager
def access_lines():
    """The access log's lines while the block runs (the service's tests serve at log level warning: INFO meanwhile)."""
    lines: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: lines.append(record.getMessage())  # type: ignore[method-assign]
    logger = logging.getLogger("uvicorn.access")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield lines
        ACCESS_LOG.flush()  # the writer thread's queue, written
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


PADDED_HEAD = b"GET /healthz HTTP/1.1\r\nHost: test\r\nX-Padding: %s\r\n\r\n" % (b"a" * 100_000)


@pytest.mark.parametrize(("head", "write_bytes", "status", "method", "line"), [
    (PADDED_HEAD, 4096, 431, "GET", '"GET /healthz HTTP/1.1" 431'),  # refused by the server mid-head
    (PADDED_HEAD, None, 431, "GET", '"GET /healthz HTTP/1.1" 431'),
    (b"GET /healthz HTTP/1.1\r\nHost: test\r\nno colon here\r\n\r\n", None, 400, "GET", '"GET /healthz HTTP/1.1" 400'),
    (b"\x16\x03\x01\x02\x00 hello\r\n\r\n", None, 400, "other", '"- - HTTP/-" 400'),  # TLS on the plain port
], ids=["431-in-4-KiB-writes", "431-in-one-write", "400-bad-header-line", "400-not-http"])
def test_an_answer_the_server_writes_itself_is_in_the_request_metrics_and_the_access_log(edge_url, head, write_bytes,
                                                                                       status, method, line):
    """A 431 or 400 to a head the app never saw is counted under route "unmatched" (the method its request line names,
    else "other") and logged, however the head arrived: one trickled over reads was neither."""
    series = f'convnext_requests_total{{method="{method}",route="unmatched",status="{status}"}}'
    before = metric(edge_url, series)
    with access_lines() as lines, raw_socket(edge_url) as sock:
        send_head(sock, head, write_bytes)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 %d " % status), answer[:200]
    assert metric(edge_url, series) == before + 1
    assert sum(text.endswith(line) for text in lines) == 1, lines
