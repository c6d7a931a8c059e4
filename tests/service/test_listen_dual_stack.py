"""Host "::" listens on IPv4 and IPv6 both: uvicorn's own bind (asyncio) was IPv6 only, so the image's healthcheck
(127.0.0.1), Docker's published ports and Prometheus on an IPv4 compose network were refused; deploy/healthcheck.py
asks the loopback that answers the host it serves on."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from deploy.host_check import DiagnosisHandler, DiagnosisServer
from service.__main__ import StartRefused, startable_settings
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


def test_a_port_taken_on_ipv4_only_is_refused_before_the_model_loads_on_the_ipv6_wildcard():
    """The start's early check binds as the server does: on "::", a port an IPv4 server holds is taken."""
    with socket.socket() as holder:
        holder.bind(("0.0.0.0", 0))
        holder.listen()
        port = holder.getsockname()[1]
        with pytest.raises(StartRefused, match=rf"the HTTP port :::{port} is taken"):
            startable_settings(["--host", "::", "--port", str(port), "--grpc-port", "0"])


def test_the_host_check_diagnosis_on_the_ipv6_wildcard_answers_ipv4_too():
    report = {"ok": False, "checks": [], "error": "no NVIDIA driver is visible"}
    handler = type("Handler", (DiagnosisHandler,), {"report": report, "key": None})
    server = DiagnosisServer(("::", 0), handler)
    try:
        assert server.socket.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY) == 0
    finally:
        server.server_close()
