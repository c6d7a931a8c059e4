"""bench.server_process against a real subprocess: ready -> yields its URL, stopped on exit; a failed start says why."""
from __future__ import annotations

import os
import urllib.request

import pytest

from bench.server_process import server_process

TOY = "tests.bench.toy_server"


def test_a_ready_server_yields_its_url_and_is_stopped_on_exit():
    with server_process(TOY, [], "/readyz", ready_timeout_s=30) as server:
        assert server.url.startswith("http://127.0.0.1:")
        with urllib.request.urlopen(f"{server.url}/readyz", timeout=5) as response:
            assert response.status == 200
        os.kill(server.pid, 0)  # alive while in use
    with pytest.raises(ProcessLookupError):
        os.kill(server.pid, 0)


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
