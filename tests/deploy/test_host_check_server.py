"""The host-check fallback's diagnosis server is bounded: a connection that sends nothing, or trickles its request,
is cut at its deadline, and connections beyond the limit are closed at once instead of each taking a thread."""
from __future__ import annotations

import contextlib
import socket
import time
from collections.abc import Iterator

import httpx
import pytest
from threaded_server import serving

from deploy.host_check import DiagnosisHandler, DiagnosisServer, address_family_for

REPORT = {"ok": False, "checks": [], "error": "no NVIDIA driver is visible"}


@contextlib.contextmanager
def diagnosis_server(deadline_s: float, host: str = "127.0.0.1") -> Iterator[int]:
    """A DiagnosisServer on `host` and a free port with 2 connections at most, each read and each connection within
    `deadline_s`; yields its port."""
    handler = type("Handler", (DiagnosisHandler,), {"report": REPORT, "key": None, "timeout": deadline_s})
    with serving(DiagnosisServer((host, 0), handler, max_connections=2, deadline_s=deadline_s)) as port:
        yield port


@pytest.fixture
def diagnosis():
    """A diagnosis server with a 1 s deadline; yields its port."""
    with diagnosis_server(deadline_s=1.0) as port:
        yield port


def seconds_until_closed(connection: socket.socket, trickle: bytes = b"") -> float:
    """Seconds until the server closes `connection`, sending it one byte of `trickle` every 0.2 s meanwhile."""
    started = time.monotonic()
    connection.settimeout(0.2)
    for byte in [trickle[i:i + 1] for i in range(len(trickle))] + [b""] * 100:
        with contextlib.suppress(OSError):
            if byte:
                connection.sendall(byte)
        try:
            if connection.recv(4096) == b"":
                return time.monotonic() - started
        except TimeoutError:
            continue
        except ConnectionError:
            return time.monotonic() - started
    raise AssertionError("the server never closed the connection")


def test_a_silent_connection_is_closed_at_its_deadline(diagnosis):
    with socket.create_connection(("127.0.0.1", diagnosis)) as silent:
        assert 0.5 < seconds_until_closed(silent) < 5


def test_a_trickling_request_is_cut_at_the_deadline_though_each_byte_is_in_time(diagnosis):
    with socket.create_connection(("127.0.0.1", diagnosis)) as trickling:
        # A byte every 0.2 s keeps each read within its own 1 s timeout; only the connection's deadline ends it.
        assert 0.8 < seconds_until_closed(trickling, b"GET /healthz HTTP/1.0\r\nX-Slow: " + b"x" * 200) < 5


def test_connections_beyond_the_limit_are_closed_at_once_and_the_probes_answer_after():
    # A 5 s deadline: a connection beyond the limit given a thread, or let in once a held one ends, would be closed
    # no sooner than that; closed at once, it is closed in a few ms (the 2 s bound leaves room for a busy machine).
    with diagnosis_server(deadline_s=5.0) as port:
        held = [socket.create_connection(("127.0.0.1", port)) for _ in range(2)]
        try:
            time.sleep(0.2)  # both accepted, each holding its slot
            with socket.create_connection(("127.0.0.1", port)) as beyond:
                assert seconds_until_closed(beyond) < 2
        finally:
            for connection in held:
                connection.close()
        deadline = time.monotonic() + 5
        while True:  # the held slots free as their threads see the close; until then a connection closes unanswered
            try:
                healthz = httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=5)
                break
            except httpx.TransportError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        assert healthz.json() == {"status": "host_check_failed", "reason": "no NVIDIA driver is visible"}
        assert healthz.headers["x-content-type-options"] == "nosniff"


def ipv6_loopback_binds() -> bool:
    if not socket.has_ipv6:
        return False
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError:
        return False
    return True


def test_the_diagnosis_server_listens_on_the_family_of_its_host():
    """CONVNEXT_HOST="::" (IPv6-only clusters; the service binds it): the stdlib server, IPv4 only, raised gaierror
    and the container crash-looped instead of holding. The family is chosen per host; "::" is served where this
    machine has IPv6, the IPv4 path always."""
    assert address_family_for("::", 8000) == socket.AF_INET6
    assert address_family_for("0.0.0.0", 8000) == address_family_for("127.0.0.1", 0) == socket.AF_INET
    hosts = ["127.0.0.1", "0.0.0.0"] + (["::", "::1"] if ipv6_loopback_binds() else [])
    for host in hosts:
        with diagnosis_server(deadline_s=5.0, host=host) as port:
            loopback = "[::1]" if ":" in host else "127.0.0.1"
            readyz = httpx.get(f"http://{loopback}:{port}/readyz", timeout=5)
        assert readyz.status_code == 503, host
        assert readyz.json()["reason"] == "host check failed: no NVIDIA driver is visible", host
