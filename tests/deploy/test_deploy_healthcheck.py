"""deploy/healthcheck.py (Docker's HEALTHCHECK) asks the service's /healthz on 127.0.0.1 directly, whatever proxy
variables Docker put into the container."""
from __future__ import annotations

import http.server
import json
import os
import subprocess
import sys

import pytest
from compose_yaml import ROOT
from threaded_server import serving

from deploy.host_check import DiagnosisHandler, DiagnosisServer
from tests.service.conftest import free_port

HEALTHCHECK = ROOT / "deploy" / "healthcheck.py"
# Docker sets these in every container when ~/.docker/config.json has "proxies" (without a noProxy naming 127.0.0.1):
# a proxy that is there but cannot reach the container's loopback, and one that is not there at all.
PROXIES = [{"http_proxy": "http://127.0.0.1:{closed}"}, {"HTTP_PROXY": "http://127.0.0.1:{closed}"},
           {"http_proxy": "http://proxy.invalid:3128", "https_proxy": "http://proxy.invalid:3128"}]


class HealthyHandler(http.server.BaseHTTPRequestHandler):
    """/healthz as the running service answers it."""

    def do_GET(self):
        body = json.dumps({"status": "ok"}).encode() if self.path == "/healthz" else b"{}"
        self.send_response(200 if self.path == "/healthz" else 404)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format, *args):
        pass


def healthcheck(port: int, proxy: dict[str, str]) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    env.update({name: value.format(closed=free_port()) for name, value in proxy.items()}, CONVNEXT_PORT=str(port))
    return subprocess.run([sys.executable, str(HEALTHCHECK)], env=env, capture_output=True, text=True, timeout=30)


@pytest.mark.parametrize("proxy", [{}, *PROXIES], ids=["no-proxy", "http_proxy", "HTTP_PROXY", "unresolvable"])
def test_a_healthy_service_is_healthy_behind_dockers_proxy_variables(proxy):
    with serving(http.server.ThreadingHTTPServer(("127.0.0.1", 0), HealthyHandler)) as port:
        result = healthcheck(port, proxy)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("proxy", [{}, PROXIES[0]], ids=["no-proxy", "http_proxy"])
def test_a_failed_host_check_is_unhealthy_with_its_reason_behind_a_proxy_too(proxy):
    """The hold mode's diagnosis server: alive, but not "ok"; the reason is the host check's, not a proxy error."""
    report = {"ok": False, "checks": [], "error": "no NVIDIA driver is visible"}
    handler = type("Handler", (DiagnosisHandler,), {"report": report, "key": None})
    with serving(DiagnosisServer(("127.0.0.1", 0), handler)) as port:
        result = healthcheck(port, proxy)
    assert result.returncode == 1
    assert result.stderr.strip() == "healthz: host_check_failed: no NVIDIA driver is visible"
