"""bench.server_process against a real subprocess: ready -> yields its URL, stopped on exit (a SIGTERM to the bench
included); a failed start says why; an http_proxy in the environment is not asked for loopback."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from bench.server_process import server_process

TOY = "tests.bench.toy_server"
ROOT = Path(__file__).resolve().parents[2]


def test_a_ready_server_yields_its_url_and_is_stopped_on_exit():
    with server_process(TOY, [], "/readyz", ready_timeout_s=30) as server:
        assert server.url.startswith("http://127.0.0.1:")
        with urllib.request.urlopen(f"{server.url}/readyz", timeout=5) as response:
            assert response.status == 200
        os.kill(server.pid, 0)  # alive while in use
    with pytest.raises(ProcessLookupError):
        os.kill(server.pid, 0)


def test_a_server_started_by_a_bench_is_not_given_the_shells_api_key(monkeypatch):
    """A key exported for `bench load` against a running service would make every request of the benches that start
    their own service (they send none) a 401; one the caller passes in `env` is given."""
    monkeypatch.setenv("CONVNEXT_API_KEY", "for-bench-load")
    monkeypatch.setenv("CONVNEXT_API_KEY_FILE", "/run/secrets/key")
    with server_process(TOY, [], "/readyz", ready_timeout_s=30) as server:
        environment = Path(f"/proc/{server.pid}/environ").read_bytes().split(b"\0")
    assert not [v for v in environment if v.startswith((b"CONVNEXT_API_KEY=", b"CONVNEXT_API_KEY_FILE="))]
    with server_process(TOY, [], "/readyz", ready_timeout_s=30, env={"CONVNEXT_API_KEY": "given"}) as server:
        environment = Path(f"/proc/{server.pid}/environ").read_bytes().split(b"\0")
    assert b"CONVNEXT_API_KEY=given" in environment


def test_a_server_that_exits_early_is_reported_with_its_log():
    with pytest.raises(RuntimeError, match=r"exited with 3(.|\n)*refusing to start"):
        with server_process(TOY, ["--exit-code", "3"], "/readyz", ready_timeout_s=30):
            pytest.fail("a server that exited must not be yielded")


def test_a_server_never_ready_times_out_with_its_log_and_is_stopped():
    # 5 s: time for the toy server to start and log it (a busy machine can take seconds), before it is given up on.
    with pytest.raises(RuntimeError, match=r"not ready after 5 s(.|\n)*toy server starting") as error:
        with server_process(TOY, ["--never-ready"], "/readyz", ready_timeout_s=5):
            pytest.fail("a server that never became ready must not be yielded")
    port = int(str(error.value).split("toy server starting on port ")[1].split()[0])
    with pytest.raises(OSError):  # stopped: nothing listens on its port any more
        urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2)


# A bench holding a server, as `timeout`, a CI cancel or `kill` finds it: it prints the server's pid, then waits.
BENCH_HOLDING_A_SERVER = """
import time
from bench.server_process import server_process
with server_process("tests.bench.toy_server", [], "/readyz", ready_timeout_s=30) as server:
    print(server.pid, flush=True)
    time.sleep(120)
"""


def test_a_bench_sent_sigterm_stops_its_server_before_it_exits():
    # The server runs in a session of its own: a bench that SIGTERM ended without unwinding left it running.
    bench = subprocess.Popen([sys.executable, "-c", BENCH_HOLDING_A_SERVER], cwd=ROOT, stdout=subprocess.PIPE,
                             text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    server_pid = None
    try:
        server_pid = int(bench.stdout.readline())
        bench.send_signal(signal.SIGTERM)
        assert bench.wait(timeout=60) == 128 + signal.SIGTERM
        with pytest.raises(ProcessLookupError):  # the server's whole process group is gone
            os.killpg(server_pid, 0)
    finally:
        bench.kill()
        bench.wait()
        if server_pid is not None:  # what this test started, were it left behind
            try:
                os.killpg(server_pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def test_sigterm_unwinds_only_while_a_server_is_up_and_the_previous_handler_is_put_back():
    before = signal.getsignal(signal.SIGTERM)
    with server_process(TOY, [], "/readyz", ready_timeout_s=30):
        assert signal.getsignal(signal.SIGTERM) is not before
    assert signal.getsignal(signal.SIGTERM) is before


# In a process of its own: urllib keeps the opener (and the proxies) of its first urlopen, which the tests above made.
BENCH_BEHIND_A_PROXY = """
from bench.server_process import server_process
with server_process("tests.bench.toy_server", [], "/readyz", ready_timeout_s=15) as server:
    print("ready", server.url)
"""


def test_readiness_is_asked_of_loopback_directly_whatever_http_proxy_says():
    # A proxy (here one that nothing answers for) cannot reach this host's loopback: asked through it, a server
    # that is up was never seen as ready.
    env = {k: v for k, v in os.environ.items() if k.lower() != "no_proxy"}
    env.update(PYTHONPATH=str(ROOT), http_proxy="http://127.0.0.1:9")
    done = subprocess.run([sys.executable, "-c", BENCH_BEHIND_A_PROXY], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.startswith("ready http://127.0.0.1:")
