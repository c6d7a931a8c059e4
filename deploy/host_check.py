"""Before serving on a GPU: run the doctor; on a wrong host, say why and stay up not ready instead of crash-looping.

A host that fails the check (no driver, old driver, no GPU, a provider that does not load) will not fix itself on a
restart, so restarting only hides the reason in a loop. Instead (CONVNEXT_HOST_CHECK=hold, the default) the
container keeps running a tiny stdlib HTTP server on the service's port:
  /healthz  200 {"status": "host_check_failed", ...}: alive, so Kubernetes' liveness probe does not restart it;
            deploy/healthcheck.py (Docker's HEALTHCHECK) wants status "ok" and marks the container unhealthy
  /readyz   503 with the reason: never ready, so no traffic reaches it
  /doctor   the doctor's full JSON report (with an API key set, only for the admin key, else the api key: 401);
            anything else 503 with the JSON error body the service uses
CONVNEXT_HOST_CHECK=exit exits with status 78 (EX_CONFIG) instead; `off` skips the check.
"""
from __future__ import annotations

import http.server
import json
import signal
import socket
import subprocess
import sys
import threading

from service.api_keys import key_accepted
from service.listen_socket import is_ipv6_wildcard

EXIT_HOST_CHECK_FAILED = 78  # sysexits.h EX_CONFIG: the host's configuration, not the program, is wrong
DOCTOR_TIMEOUT_S = 600  # the first CUDA initialisation and a one-layer TensorRT build take seconds, not minutes
# The diagnosis server's bounds, against clients that connect and then send slowly or nothing (slowloris): each
# connection is one request (HTTP/1.0), closed CONNECTION_DEADLINE_S after it opened whatever it is doing, and at
# most MAX_CONNECTIONS are served at once (a thread each); one beyond is closed at once.
CONNECTION_DEADLINE_S = 10.0
MAX_CONNECTIONS = 32


def run_doctor(engine: str, provider: str, timeout_s: float = DOCTOR_TIMEOUT_S) -> dict:
    """The doctor's JSON report for serving with `engine`/`provider`, in a child process (a crashing driver library
    takes down the child, not the entrypoint)."""
    command = [sys.executable, "-m", "service", "doctor", "--json", "--engine", engine, "--provider", provider]
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s, check=False)
    except subprocess.TimeoutExpired:
        return {"ok": False, "checks": [], "error": f"the host check did not finish within {timeout_s:.0f} s"}
    try:
        return json.loads(result.stdout)
    except ValueError:
        tail = (result.stderr or result.stdout).strip()[-2000:]
        return {"ok": False, "checks": [], "error": f"the host check crashed (exit {result.returncode}): {tail}"}


def failure_reason(report: dict) -> str:
    """One line naming each failed required check, its reason and its fix."""
    if report.get("error"):
        return report["error"]
    failed = [c for c in report["checks"] if c["required"] and not c["ok"]]
    return "; ".join(f"{c['name']}: {c['detail']}" + (f" (fix: {c['fix']})" if c["fix"] else "") for c in failed)


def describe(report: dict) -> str:
    """The report as log lines, the way `python -m service doctor` prints it."""
    lines = [f"host check {'passed' if report['ok'] else 'FAILED'}"]
    for check in report.get("checks", []):
        mark = "ok  " if check["ok"] else "FAIL" if check["required"] else "--  "
        lines.append(f"  {mark} {check['name']:<30} {check['detail']}")
    if not report["ok"]:
        lines.append(f"  reason: {failure_reason(report)}")
    return "\n".join(lines)


def address_family_for(host: str, port: int) -> socket.AddressFamily:
    """The family of the first address `host` resolves to for a listening socket: AF_INET6 for "::" (an IPv6-only
    cluster's CONVNEXT_HOST, which the service binds) or "::1", AF_INET for "0.0.0.0"."""
    return socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0][0]


class DiagnosisServer(http.server.ThreadingHTTPServer):
    """A thread per connection, at most `max_connections` at once, each closed `deadline_s` after it opened; on the
    address family of its host (the stdlib's server is IPv4 only: "::" failed to resolve, and the container crash-looped
    instead of holding), "::" for IPv4 too."""

    def __init__(self, address, handler, max_connections: int = MAX_CONNECTIONS,
                 deadline_s: float = CONNECTION_DEADLINE_S):
        self.address_family = address_family_for(*address)
        super().__init__(address, handler)
        self.slots = threading.BoundedSemaphore(max_connections)
        self.deadline_s = deadline_s

    def server_bind(self):
        if self.address_family == socket.AF_INET6 and is_ipv6_wildcard(self.server_address[0]):
            # "::" answers IPv4 too, as the service's own listener (service/listen_socket.py): the healthcheck's
            # 127.0.0.1 reads the diagnosis, not a refused connection. Needed on a kernel with net.ipv6.bindv6only=1
            # (its IPv6 sockets start IPv6 only, and the stdlib's server leaves them so); the default 0 has it already.
            self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        super().server_bind()

    def process_request(self, request, client_address):
        if not self.slots.acquire(blocking=False):
            self.shutdown_request(request)  # all slots taken: closed unanswered, the client may retry
            return
        try:
            super().process_request(request, client_address)  # starts the connection's thread
        except BaseException:
            self.slots.release()
            raise

    def process_request_thread(self, request, client_address):
        # ThreadingMixIn's, with a deadline: a shutdown from the timer's thread ends a read or write blocked in the
        # connection's own thread. The timer is stopped (and waited for) before the socket is closed.
        deadline = threading.Timer(self.deadline_s, end_connection, (request,))
        deadline.start()
        try:
            self.finish_request(request, client_address)
        except Exception:
            self.handle_error(request, client_address)
        finally:
            deadline.cancel()
            deadline.join()
            self.shutdown_request(request)
            self.slots.release()

    def handle_error(self, request, client_address):
        if not isinstance(sys.exc_info()[1], OSError):  # a client gone or cut at its deadline is not worth a traceback
            super().handle_error(request, client_address)


def end_connection(connection: socket.socket) -> None:
    try:
        connection.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass  # the client has gone already


class DiagnosisHandler(http.server.BaseHTTPRequestHandler):
    timeout = CONNECTION_DEADLINE_S  # each read's socket timeout (StreamRequestHandler); the server bounds the total
    report: dict = {}
    key: bytes | None = None  # the service's admin key (else its api key): /doctor's report describes the host

    def do_GET(self):
        reason = failure_reason(self.report)
        if self.path == "/healthz":
            self._send(200, {"status": "host_check_failed", "reason": reason})
        elif self.path == "/readyz":
            self._send(503, {"status": "not_ready", "reason": f"host check failed: {reason}"})
        elif self.path == "/doctor" and self.key is not None and not key_accepted(
                [(name.lower().encode("latin-1"), value.encode("latin-1")) for name, value in self.headers.items()],
                self.key):
            self._send(401, {"error": {"code": "unauthorized", "message": "missing or invalid API key"}})
        elif self.path == "/doctor":
            self._send(200, self.report)
        else:
            self._send(503, {"error": {"code": "host_check_failed", "message": reason}})

    do_POST = do_PUT = do_DELETE = do_GET  # any request gets the diagnosis (HTTP/1.0: the connection then closes)

    def _send(self, status: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format, *args):
        pass  # probes every few seconds would bury the diagnosis in the log


def hold(report: dict, host: str, port: int, key: str | None = None) -> int:
    """Serve the diagnosis until SIGTERM/SIGINT (docker stop, pod deletion), then exit 0. With a key, /doctor asks
    for it as the service's /admin does (Authorization: Bearer or X-API-Key); the probes stay open."""
    handler = type("Handler", (DiagnosisHandler,), {"report": report, "key": key.encode() if key else None})
    server = DiagnosisServer((host, port), handler)

    def stop(signum, frame):
        threading.Thread(target=server.shutdown, daemon=True).start()  # shutdown() waits for serve_forever

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"  # an IPv6 address in a URL is bracketed
    print(f"host check failed: not serving; the diagnosis is on http://{where}/readyz (503) and /doctor. "
          "Fix the host and restart the container.", file=sys.stderr, flush=True)
    server.serve_forever()
    server.server_close()
    return 0
