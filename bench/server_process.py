"""The one way a benchmark starts a server: `python -m MODULE` on a free loopback port, waited for, then stopped."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from convnext_common import usable_cpus
from runtime.decode import FAST_DECODE_HEADROOM

LOG_TAIL_CHARS = 3000
STOP_GRACE_S = 15.0


@dataclass(frozen=True)
class RunningServer:
    """A started, ready server: its base URL (http://127.0.0.1:PORT) and its process id (for RSS)."""

    url: str
    pid: int


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


SERVICE_QUEUE_DELAY_MS = 5.0  # the service's own default (service/settings.py), pinned where a bench keeps it


def measurement_pins(*, decode_mode: str = "exact", ort_streams: int = 1, ort_spinning: bool = True,
                     fast_decode_headroom: float = FAST_DECODE_HEADROOM,
                     max_queue_delay_ms: float = SERVICE_QUEUE_DELAY_MS, preprocess_workers: int | None = None
                     ) -> list[str]:
    """`python -m service` flags pinning the settings that change what a benchmark measures (default: the service's
    own defaults; preprocess workers: the CPUs this process may use, as the service counts them). A flag overrides
    its CONVNEXT_* variable: unpinned, one in the bench's environment would change "ours" but not the engine alone or
    the peer that it is compared with."""
    workers = preprocess_workers or usable_cpus()
    return ["--decode-mode", decode_mode, "--fast-decode-headroom", str(fast_decode_headroom),
            "--ort-streams", str(ort_streams), "--ort-spinning", "true" if ort_spinning else "false",
            "--max-queue-delay-ms", str(max_queue_delay_ms), "--preprocess-workers", str(workers)]


def service(args: Sequence[str], env: Mapping[str, str] | None = None, ready_timeout_s: float = 120.0):
    """Our service (`python -m service ARGS`) on loopback, ready when /readyz answers 200; HTTP only (the benches time
    HTTP, and no gRPC port is taken from a service already running on this host)."""
    return server_process("service", ["--host", "127.0.0.1", "--grpc-port", "0", *args], "/readyz", ready_timeout_s,
                          env)


def litserve_peer(args: Sequence[str], ready_timeout_s: float = 120.0):
    """The LitServe peer (`python -m bench.peer_litserve ARGS`, loopback only), ready when /health answers 200."""
    return server_process("bench.peer_litserve", args, "/health", ready_timeout_s)


# The service's keys: the benches send none to a server they start, so one in the bench's shell (set for `bench load`
# against a running service) would make every request a 401. A server that should want a key is given it in `env`.
KEY_VARIABLES = ("CONVNEXT_API_KEY", "CONVNEXT_API_KEY_FILE", "CONVNEXT_ADMIN_API_KEY", "CONVNEXT_ADMIN_API_KEY_FILE")


def server_environment() -> dict[str, str]:
    """This process's environment for a server the bench starts, without the service's API keys."""
    return {name: value for name, value in os.environ.items() if name not in KEY_VARIABLES}


@contextmanager
def server_process(module: str, args: Sequence[str], ready_path: str, ready_timeout_s: float = 120.0,
                   env: Mapping[str, str] | None = None, cwd: str | Path | None = None) -> Iterator[RunningServer]:
    """Run `python -m MODULE ARGS --port P` until `ready_path` answers 200; stop it (and its children) on exit.

    The server's output goes to a temporary log whose tail is in the error when it exits early or is not ready
    in time, so a failed start says why.
    """
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    command = [sys.executable, "-m", module, *args, "--port", str(port)]
    with tempfile.TemporaryFile() as log, _sigterm_unwinds():
        # A session of its own, so teardown reaches the server's worker processes too (LitServe spawns some).
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                   env={**server_environment(), **(env or {})}, cwd=cwd)
        try:
            _wait_ready(process, f"{url}{ready_path}", ready_timeout_s, log)
            yield RunningServer(url, process.pid)
        finally:
            _stop_group(process)


@contextmanager
def _sigterm_unwinds() -> Iterator[None]:
    """While the block runs, SIGTERM (timeout(1), a CI cancel, kill) raises SystemExit(143) instead of ending the
    process on the spot: the server is in a session of its own, so nothing else would stop it, and only an unwinding
    `finally` does. The previous handler is back afterwards. Python runs signal handlers in the main thread only, and
    only there may one be set: elsewhere this changes nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _exit_on_sigterm)
    try:
        yield
    finally:  # None: a handler set outside Python, which cannot be put back; the default is the nearest
        signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)


def _exit_on_sigterm(signum: int, frame) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM must not cut the server's stop short
    raise SystemExit(128 + signum)


def _wait_ready(process: subprocess.Popen, ready_url: str, timeout_s: float, log: IO[bytes]) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"{' '.join(process.args[1:3])} exited with {process.returncode} before "
                               f"{ready_url} answered:\n{_tail(log)}")
        if _answers_ok(ready_url):
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"{ready_url} not ready after {timeout_s} s; the server's log ends:\n{_tail(log)}")
        time.sleep(0.3)


def _answers_ok(url: str) -> bool:
    # Asked of 127.0.0.1 directly: urllib's default opener sends it to an http_proxy from the environment (a CI
    # runner's, a corporate host's) unless no_proxy lists it, and a proxy cannot reach this host's loopback.
    direct = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with direct.open(url, timeout=2) as response:
            return response.status == 200
    except OSError:  # nothing listening yet (URLError), or an HTTPError such as 503 while the model loads
        return False


def _tail(log: IO[bytes]) -> str:
    log.seek(0)
    return log.read().decode(errors="replace")[-LOG_TAIL_CHARS:]


def _stop_group(process: subprocess.Popen) -> None:
    """SIGTERM the server's process group, wait for the leader, then SIGKILL whatever is left."""
    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(STOP_GRACE_S)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        pass
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.wait()
