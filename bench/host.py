"""The machine a benchmark runs on and the server processes it starts: its CPU's name, a free port, a server."""
from __future__ import annotations

import os
import platform
import signal
import socket
import subprocess
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def server_process(command: list[str], ready_url: str, timeout_s: float = 120.0, env: dict | None = None):
    """Start a loopback server subprocess, wait until `ready_url` answers 200, stop it (SIGTERM) afterwards."""
    import httpx

    log = tempfile.TemporaryFile()
    # A session of its own, so teardown reaches the server's worker processes too (LitServe spawns some).
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                               env=None if env is None else {**os.environ, **env})
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            if process.poll() is not None:
                log.seek(0)
                raise RuntimeError(f"{command[:3]} exited with {process.returncode}:\n{log.read().decode()[-3000:]}")
            try:
                if httpx.get(ready_url, timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"{ready_url} not ready after {timeout_s} s")
            time.sleep(0.3)
        yield process
    finally:
        _stop_group(process)
        log.close()


def _stop_group(process: subprocess.Popen) -> None:
    """SIGTERM the server's process group, wait up to 15 s for the leader, then SIGKILL whatever is left."""
    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(15)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        pass
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.wait()


def cpu_model() -> str:
    """The CPU's name and widest SIMD: numbers from different CPUs are not comparable, so the report names it."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or "unknown CPU"
    name = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), "?")
    simd = "AVX-512" if " avx512f" in info else "AVX2" if " avx2" in info else "no AVX2"
    return f"{name} ({simd})"
