"""Process lifecycle: `python -m service` serves, SIGTERM drains in-flight requests; no TensorRT is a clear error."""
from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from prometheus_client import generate_latest

from runtime.engines.base import EngineError
from runtime.engines.tensorrt import TensorRTEngine
from service.access_log import AccessLog
from service.metrics import ServiceMetrics
from tests.service.conftest import access_handler, access_lines

ROOT = Path(__file__).resolve().parents[2]


def inflight(url: str) -> float:
    text = httpx.get(f"{url}/metrics").text
    return float(next(line.split()[-1] for line in text.splitlines() if line.startswith("convnext_inflight_requests ")))


def test_sigterm_finishes_in_flight_requests_then_exits(model_repository, real_photos):
    from tests.service.conftest import free_port, wait_ready

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "CONVNEXT_INTRA_OP_THREADS": "1", "CONVNEXT_WARMUP_RUNS": "0"}
    process = subprocess.Popen([sys.executable, "-m", "service", "--repository", str(model_repository),
                                "--host", "127.0.0.1", "--port", str(port), "--max-batch-size", "1"],
                               cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        wait_ready(url, alive=lambda: process.poll() is None)
        files = [("files", (p.name, p.read_bytes(), "image/*")) for p in real_photos] * 4

        def post(_):
            return httpx.post(f"{url}/classify", files=files, timeout=60)

        with ThreadPoolExecutor(6) as pool:
            futures = [pool.submit(post, i) for i in range(6)]
            while inflight(url) < 7 and not any(f.done() for f in futures):  # 6 classify + this /metrics
                time.sleep(0.01)
            process.send_signal(signal.SIGTERM)
            responses = [f.result() for f in futures]
        assert [r.status_code for r in responses] == [200] * 6
        assert all(len(r.json()["results"]) == 24 for r in responses)
        # uvicorn re-raises the SIGTERM it caught once shutdown is complete, so the exit status is -SIGTERM.
        assert process.wait(30) in (0, -signal.SIGTERM)
        output = process.stdout.read()
        assert b"Application shutdown complete" in output
        # The access log is written by a thread (service/server.py); every line is out before the process ends.
        assert output.count(b'"POST /classify HTTP/1.1" 200') == 6
        with pytest.raises(httpx.TransportError):
            httpx.get(f"{url}/healthz")
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_tensorrt_engine_without_tensorrt_says_what_to_do(tmp_path):
    engine = TensorRTEngine(tmp_path / "model.plan", (3, 64, 64))
    with pytest.raises(EngineError, match=r"pip install -e '\.\[serve,gpu\]' --extra-index-url https://pypi\.nvidia\.com"):
        engine.load()


def test_cli_flags_override_environment(monkeypatch):
    from service.__main__ import settings_from_args

    monkeypatch.setenv("CONVNEXT_MAX_BATCH_SIZE", "4")
    monkeypatch.setenv("CONVNEXT_PORT", "9001")
    settings = settings_from_args(["--port", "9100", "--provider", "cuda", "--max-queue-delay-ms", "2.5"])
    assert (settings.port, settings.max_batch_size, settings.provider, settings.max_queue_delay_ms) == \
        (9100, 4, "cuda", 2.5)
    # --version prints the project version; the model version's flag is --model-version, its variable unchanged.
    assert settings_from_args(["--model-version", "3"]).version == 3
    monkeypatch.setenv("CONVNEXT_VERSION", "2")
    assert settings_from_args([]).version == 2
    with pytest.raises(ValueError):
        settings_from_args(["--engine", "pytorch"])


def test_access_log_lines_are_uvicorns_and_the_setting_turns_them_off(model_repository, real_photos):
    """One line per request in uvicorn's access format, ending with the request's id, written by
    service/access_log.py's thread; off with --access-log false, the server's own refusals before routing (431 here)
    included (both processes end on SIGTERM, so the lines also prove the flush at shutdown)."""
    from tests.service.conftest import free_port, wait_ready

    outputs, fresh_ids = {}, {}
    for access_log in ("true", "false"):
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        env = {**os.environ, "CONVNEXT_INTRA_OP_THREADS": "1", "CONVNEXT_WARMUP_RUNS": "0"}
        process = subprocess.Popen([sys.executable, "-m", "service", "--repository", str(model_repository),
                                    "--host", "127.0.0.1", "--port", str(port), "--access-log", access_log],
                                   cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        try:
            wait_ready(url, alive=lambda process=process: process.poll() is None)
            assert httpx.post(f"{url}/classify?top_k=2", content=real_photos[0].read_bytes(),
                              headers={"Content-Type": "image/jpeg", "X-Request-ID": "client-id-1"}).status_code == 200
            not_found = httpx.get(f"{url}/nowhere")
            assert not_found.status_code == 404
            fresh_ids[access_log] = not_found.headers["x-request-id"]
            # Just over the 64 KiB head limit: the head arrives whole (the first socket read is under the limit), so
            # the server refuses it on its way to the app (service.server.EdgeLimitsMixin._refuse).
            assert httpx.get(f"{url}/models", headers={"X-Pad": "x" * 65_600}).status_code == 431
            process.send_signal(signal.SIGTERM)
            process.wait(30)
            outputs[access_log] = process.stdout.read().decode()
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
    assert '127.0.0.1:' in outputs["true"] and '"POST /classify?top_k=2 HTTP/1.1" 200' in outputs["true"]
    assert '"GET /nowhere HTTP/1.1" 404' in outputs["true"] and '"GET /models HTTP/1.1" 431' in outputs["true"]
    # Each line ends with the request's id, as the answer's X-Request-ID says it (the client's, else a fresh one); the
    # server's own refusal, which the app never saw, with "-".
    lines = outputs["true"].splitlines()
    assert any(line.endswith('"POST /classify?top_k=2 HTTP/1.1" 200 OK client-id-1') for line in lines)
    assert any(line.endswith(f'"GET /nowhere HTTP/1.1" 404 Not Found {fresh_ids["true"]}') for line in lines)
    assert any(line.endswith('"GET /models HTTP/1.1" 431 Request Header Fields Too Large -') for line in lines)
    assert "/classify" not in outputs["false"] and "Application shutdown complete" in outputs["false"]
    assert "/models" not in outputs["false"]


def test_the_access_log_writer_survives_a_line_it_cannot_format():
    """One bad entry must not end the writer thread: the queue would then grow with every request, unbounded."""
    with access_lines() as lines:
        log = AccessLog()
        good = {"type": "http", "method": "GET", "path": "/healthz", "query_string": b"", "http_version": "1.1",
                "client": ("127.0.0.1", 5000), "headers": []}
        log.record({"type": "http"}, 200)  # no method, path or client: formatting it raises
        log.record(good, 200)
        log.flush()
    assert log.dropped == 1
    assert lines == ['127.0.0.1:5000 - "GET /healthz HTTP/1.1" 200']


HEALTHZ_SCOPE = {"type": "http", "method": "GET", "path": "/healthz", "query_string": b"", "http_version": "1.1",
                 "client": ("127.0.0.1", 5000), "headers": []}


@contextlib.contextmanager
def stalled_output() -> Iterator[tuple[threading.Event, threading.Event]]:
    """The access logger's output stalled (a stdout that takes nothing) until `stalled` is set, at most 10 s;
    yields (emitting: set once the writer is stuck in a line, stalled)."""
    stalled, emitting = threading.Event(), threading.Event()

    def stalled_emit(record):
        emitting.set()
        stalled.wait(10)

    with access_handler(stalled_emit):
        try:
            yield emitting, stalled
        finally:
            stalled.set()


def test_the_flush_at_shutdown_does_not_wait_without_end_for_a_stalled_output(monkeypatch, caplog):
    """The flush joined the writer without a bound: behind a stdout that takes nothing, the process never exited."""
    monkeypatch.setattr("service.access_log.FLUSH_TIMEOUT_S", 0.2)
    log = AccessLog()
    with stalled_output() as (emitting, stalled):
        for _ in range(3):
            log.record(HEALTHZ_SCOPE, 200)
        assert emitting.wait(10)
        with caplog.at_level(logging.WARNING, logger="convnext.service"):
            started = time.monotonic()
            log.flush()
            waited = time.monotonic() - started
    for writer in [t for t in threading.enumerate() if t.name == "access-log"]:
        writer.join(10)  # released: it writes its last lines and ends, not into the next test's logger
    assert waited < 5
    assert any("took no line for 0.2 s: about" in r.getMessage() for r in caplog.records), caplog.text


def test_dropped_access_lines_are_in_a_metric_and_a_warning(monkeypatch, caplog):
    """Lines dropped while the log's output is stalled (its queue full) are counted in
    convnext_access_log_dropped_total and warned of while it is stalled (the first at once, the rest at the flush)."""
    monkeypatch.setattr("service.access_log.MAX_QUEUED_LINES", 1)
    log = AccessLog()
    with stalled_output() as (emitting, stalled):
        log.record(HEALTHZ_SCOPE, 200)
        assert emitting.wait(10)  # the writer is stuck in the first line: the next is queued, the 3 after it dropped
        with caplog.at_level(logging.WARNING, logger="convnext.service"):
            for _ in range(4):
                log.record(HEALTHZ_SCOPE, 200)
            while_stalled = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
            stalled.set()
            log.flush()
    assert log.dropped == 3
    assert len(while_stalled) == 1 and while_stalled[0].startswith("1 access log lines dropped (1 since the start)")
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2 and warnings[1].startswith("2 access log lines dropped (3 since the start)"), warnings
    rendered = generate_latest(ServiceMetrics(log).registry).decode()
    assert "convnext_access_log_dropped_total 3.0" in rendered.splitlines()
