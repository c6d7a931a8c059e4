"""Host "::" listens on IPv4 and IPv6 both: uvicorn's own bind (asyncio) was IPv6 only, so the image's healthcheck
(127.0.0.1), Docker's published ports and Prometheus on an IPv4 compose network were refused; deploy/healthcheck.py
asks the loopback that answers the host it serves on."""
from __future__ import annotations

import asyncio
import errno
import os
import socket
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import uvicorn
from uvicorn.server import STARTUP_FAILURE

from deploy.host_check import DiagnosisHandler, DiagnosisServer
from service import listen_socket
from service.__main__ import StartRefused, startable_settings
from service.server import Server
from tests.service.conftest import free_port

ROOT = Path(__file__).resolve().parents[2]


def healthcheck(host: str, port: int) -> subprocess.CompletedProcess:
    """deploy/healthcheck.py (Docker's HEALTHCHECK) as the container runs it: CONVNEXT_HOST and CONVNEXT_PORT set."""
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    env.update(CONVNEXT_HOST=host, CONVNEXT_PORT=str(port))
    return subprocess.run([sys.executable, str(ROOT / "deploy" / "healthcheck.py")], env=env, capture_output=True,
                          text=True, timeout=30)


def test_the_service_on_the_ipv6_wildcard_answers_ipv4_and_ipv6_and_is_healthy(model_repository, launch):
    grpc_port = free_port()
    with launch(model_repository, host="::", grpc_port=grpc_port) as url:
        port = int(url.rsplit(":", 1)[1])
        for loopback in ("127.0.0.1", "[::1]"):
            assert httpx.get(f"http://{loopback}:{port}/healthz", timeout=5).json()["status"] == "ok", loopback
        # The gRPC port too (grpc core binds "[::]" for both families itself).
        socket.create_connection(("127.0.0.1", grpc_port), timeout=5).close()
        result = healthcheck("::", port)
    assert result.returncode == 0, result.stderr


def test_the_healthcheck_asks_the_ipv6_loopback_the_service_listens_on(model_repository, launch):
    with launch(model_repository, host="::1", grpc_port=0) as url:
        port = int(url.rsplit(":", 1)[1])
        result = healthcheck("::1", port)
    assert result.returncode == 0, result.stderr


async def plain_app(scope, receive, send) -> None:
    """An ASGI app with nothing to load: the server's own start is what is tested."""


async def start_then_stop(server: uvicorn.Server) -> None:
    """server.serve(), stopped once it has started (a start that fails raises out of here: SystemExit)."""

    async def stop_once_started() -> None:
        while not server.started:
            await asyncio.sleep(0.05)
        server.should_exit = True

    stopper = asyncio.create_task(stop_once_started())
    try:
        await server.serve()
    finally:
        stopper.cancel()


def test_a_port_taken_on_ipv4_only_fails_the_start_on_the_ipv6_wildcard():
    """On "::" a port an IPv4 server holds is taken: refused by the start's early check, and by the server's own bind
    when taken after that check (during the model's load). uvicorn's bind (asyncio's, IPV6_V6ONLY on) succeeded there
    and the service served IPv6 alone."""
    with socket.socket() as holder:
        holder.bind(("0.0.0.0", 0))
        holder.listen()
        port = holder.getsockname()[1]
        with pytest.raises(StartRefused, match=rf"the HTTP port :::{port} is taken"):
            startable_settings(["--host", "::", "--port", str(port), "--grpc-port", "0"])
        server = Server(uvicorn.Config(plain_app, host="::", port=port, lifespan="off", log_level="critical"))
        with pytest.raises(SystemExit) as exited:
            asyncio.run(start_then_stop(server))
    assert exited.value.code == STARTUP_FAILURE


def test_a_host_address_this_machine_lacks_is_not_called_a_taken_port():
    """192.0.2.1 (TEST-NET-1, never a local address): the bind fails with EADDRNOTAVAIL, which said "the port is
    taken ... stop the server using it"; it names the host instead."""
    with pytest.raises(StartRefused) as refused:
        startable_settings(["--host", "192.0.2.1", "--port", str(free_port()), "--grpc-port", "0"])
    assert refused.value.status == 3
    assert "is taken" not in str(refused.value) and "stop the server" not in str(refused.value)
    assert "this host has no address 192.0.2.1" in str(refused.value) and "--host 0.0.0.0" in str(refused.value)


def test_a_host_with_ipv6_turned_off_is_told_to_listen_on_ipv4(monkeypatch):
    """A kernel booted with ipv6.disable=1: socket(AF_INET6) fails with EAFNOSUPPORT, and `--host ::` said the port
    was taken. The refusal says the host has no IPv6 and names 0.0.0.0 (the socket's creation fails as there)."""
    real_socket = socket.socket

    def socket_without_ipv6(family=socket.AF_INET, *args, **kwargs):
        if family == socket.AF_INET6:
            raise OSError(errno.EAFNOSUPPORT, os.strerror(errno.EAFNOSUPPORT))
        return real_socket(family, *args, **kwargs)

    monkeypatch.setattr(listen_socket.socket, "socket", socket_without_ipv6)
    with pytest.raises(StartRefused) as refused:
        startable_settings(["--host", "::", "--port", str(free_port()), "--grpc-port", "0"])
    assert refused.value.status == 3
    assert str(refused.value).startswith("the HTTP port :::") and "is taken" not in str(refused.value)
    assert "this host has no IPv6" in str(refused.value) and "pass --host 0.0.0.0" in str(refused.value)


@pytest.mark.parametrize(("code", "phrase"), [(errno.EADDRINUSE, "is taken"),
                                              (errno.EACCES, "need root or CAP_NET_BIND_SERVICE"),
                                              (errno.EADDRNOTAVAIL, "has no address"),
                                              (errno.EAFNOSUPPORT, "has no IPv6")])
def test_only_an_address_in_use_is_called_taken(code, phrase):
    message = listen_socket.bind_refusal(OSError(code, os.strerror(code)), "HTTP", "::", 80, "--port")
    assert phrase in message and ("is taken" in message) == (code == errno.EADDRINUSE), message


def test_the_host_check_diagnosis_on_the_ipv6_wildcard_answers_ipv4_too():
    """On a kernel with net.ipv6.bindv6only=1 an IPv6 socket starts IPv6 only (the stdlib's server leaves it so): the
    override turns that off, as the default (0) already has it. Such a kernel's default is set before the bind."""

    class OnBindv6onlyKernel(DiagnosisServer):
        def server_bind(self):
            self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)  # bindv6only=1's default
            super().server_bind()

    report = {"ok": False, "checks": [], "error": "no NVIDIA driver is visible"}
    handler = type("Handler", (DiagnosisHandler,), {"report": report, "key": None})
    server = OnBindv6onlyKernel(("::", 0), handler)
    try:
        assert server.socket.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY) == 0
        socket.create_connection(("127.0.0.1", server.server_address[1]), timeout=5).close()
    finally:
        server.server_close()
