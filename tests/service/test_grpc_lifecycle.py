"""The gRPC server's lifecycle: a cancelled call drops its queued images, a call past its deadline is counted as the
DEADLINE_EXCEEDED its client sees, shutdown lets calls in flight finish, refuses new ones while HTTP drains and
answers those left at its grace's end UNAVAILABLE, and the port setting, from the CLI to a start that fails on a taken
port."""
from __future__ import annotations

import asyncio
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

import grpc
import httpx
import numpy as np
import pytest
import tritonclient.grpc as triton_grpc
from prometheus_client import generate_latest
from tritonclient.utils import InferenceServerException

from service.app import create_app
from service.grpc_server import ERROR_CODE_KEY, RETRY_PUSHBACK_KEY, GrpcService
from service.settings import Settings
from tests.service.conftest import free_port, metric
from tests.service.test_grpc import fp32_input, grpc_address, preprocessed_photos, status_of
from tests.service.test_grpc_limits import stalled_call
from tests.service.test_hot_swap import wait_for
from tests.service.test_limits import Gate, wait_for_metric

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def batch(model_repository, real_photos) -> np.ndarray:
    return preprocessed_photos(model_repository, real_photos)


def test_a_cancelled_call_drops_its_queued_images(model_repository, launch, batch):
    gate = Gate()
    with launch(model_repository, gate.factory, grpc_port=free_port(), max_batch_size=1,
                warmup_runs=0) as url:
        client = triton_grpc.InferenceServerClient(grpc_address(url))
        gate.close()
        first = threading.Thread(target=client.infer, args=("atto", [fp32_input(batch[:1])]))
        first.start()
        assert gate.batch_started.wait(20)  # the first call holds the engine
        leaving = client.async_infer("atto", [fp32_input(np.concatenate([batch, batch[:1]]))], callback=lambda *_: None)
        wait_for_metric(url, "convnext_queue_depth", 4)
        leaving.cancel()  # while its four images wait behind the first call
        wait_for_metric(url, 'convnext_rejected_total{reason="client_disconnected"}', 1)
        gate.open.set()
        first.join()
        assert client.infer("atto", [fp32_input(batch[:1])]).as_numpy("logits").shape == (1, 10)
        assert metric(url, "convnext_images_total") == 2  # the first and the last call, none of the four


@pytest.mark.parametrize("waiting_for", ["its batch", "its message"])
def test_a_call_past_its_deadline_is_counted_as_the_deadline_exceeded_its_client_sees(model_repository, launch, batch,
                                                                                       waiting_for):
    """Before: counted CANCELLED and client_disconnected, as if the client had left."""
    gate = Gate()
    with launch(model_repository, gate.factory, grpc_port=free_port(), max_batch_size=1, warmup_runs=0) as url:
        try:
            if waiting_for == "its batch":
                client = triton_grpc.InferenceServerClient(grpc_address(url))
                gate.close()  # the call's batch is held by the engine past the call's deadline (and until counted)
                with pytest.raises(InferenceServerException) as late:
                    client.infer("atto", [fp32_input(batch[:1])], client_timeout=1.0)
                method, seen = "ModelInfer", status_of(late.value)
            else:  # its message never comes (body_deadline_s is longer than the call's deadline)
                method, seen = "ModelReady", stalled_call(grpc_address(url), timeout_s=1.0)[0].name
            assert seen == "DEADLINE_EXCEEDED"
            wait_for_metric(url, f'convnext_grpc_requests_total{{code="DEADLINE_EXCEEDED",method="{method}"}}', 1)
            assert metric(url, 'convnext_rejected_total{reason="client_deadline"}') == 1
            assert metric(url, 'convnext_rejected_total{reason="client_disconnected"}') == 0
            assert metric(url, "convnext_grpc_requests_total") == 1
        finally:
            gate.open.set()


def test_a_call_still_in_flight_when_the_shutdowns_grace_ends_is_answered_unavailable_and_counted_so(
        model_repository, launch):
    """A call whose message is still arriving when the grace (request_timeout_ms) is over: answered UNAVAILABLE
    shutting_down with a retry hint, and counted so. Before: grpc's stop ended it (UNAVAILABLE, no code, no hint) and
    the metrics said RESOURCE_EXHAUSTED body_too_large."""
    seen = []
    with launch(model_repository, grpc_port=free_port(), request_timeout_ms=1000, body_deadline_s=60) as url:
        address = grpc_address(url)
        call = threading.Thread(target=lambda: seen.append(stalled_call(address)))
        call.start()
        wait_for(lambda: metric(url, "convnext_grpc_inflight_calls") == 1, "the call to be in flight")
        registry = url.app.state.metrics.registry
    call.join(30)
    code, trailers = seen[0]
    assert (code, trailers.get(ERROR_CODE_KEY)) == (grpc.StatusCode.UNAVAILABLE, "shutting_down")
    assert trailers.get(RETRY_PUSHBACK_KEY) == "1000"
    scrape = generate_latest(registry).decode()
    assert 'convnext_grpc_requests_total{code="UNAVAILABLE",method="ModelReady"} 1.0' in scrape
    assert 'convnext_rejected_total{reason="shutting_down"} 1.0' in scrape
    assert 'reason="body_too_large"' not in scrape and 'reason="client_disconnected"' not in scrape


def test_shutdown_lets_an_in_flight_call_finish(model_repository, launch, batch):
    gate = Gate()
    results = []
    with launch(model_repository, gate.factory, grpc_port=free_port(), max_batch_size=1,
                warmup_runs=0) as url:
        client = triton_grpc.InferenceServerClient(grpc_address(url))
        gate.close()
        call = threading.Thread(target=lambda: results.append(client.infer("atto", [fp32_input(batch[:1])])))
        call.start()
        assert gate.batch_started.wait(20)
        grpc_service = url.app.state.grpc

        def finish_once_shutting_down():  # the engine finishes after the shutdown has begun (leaving `launch` below)
            try:
                wait_for_shutdown_begun(url, grpc_service)
            finally:
                gate.open.set()

        threading.Thread(target=finish_once_shutting_down).start()
    call.join(30)
    assert results and results[0].as_numpy("logits").shape == (1, 10)


def test_shutdown_refuses_new_calls_while_http_requests_drain(model_repository, launch, batch, real_photos):
    """Shutdown stops both protocols at once: while an HTTP request is still in flight (its batch held by the engine),
    a new gRPC call is refused (UNAVAILABLE, so a client retries elsewhere) instead of being queued behind it, and the
    HTTP request is still answered."""
    gate = Gate()
    answers, late_calls = [], []
    jpeg = real_photos[0].read_bytes()
    with launch(model_repository, gate.factory, grpc_port=free_port(), max_batch_size=1,
                warmup_runs=0) as url:
        client = triton_grpc.InferenceServerClient(grpc_address(url))
        assert client.is_server_ready()  # the channel is connected before the shutdown
        gate.close()
        request = threading.Thread(target=lambda: answers.append(httpx.post(
            f"{url}/classify", content=jpeg, headers={"content-type": "image/jpeg"}, timeout=30)))
        request.start()
        assert gate.batch_started.wait(20)
        grpc_service = url.app.state.grpc

        def late_call():  # once the shutdown has begun (leaving `launch` below), while the HTTP request is held
            try:
                wait_for_shutdown_begun(url, grpc_service)
                client.infer("atto", [fp32_input(batch[:1])], client_timeout=10)
                late_calls.append("OK")
            except InferenceServerException as err:
                late_calls.append(status_of(err))
            except (TimeoutError, RuntimeError) as err:
                late_calls.append(str(err))
            finally:
                gate.open.set()

        late = threading.Thread(target=late_call)
        late.start()
    request.join(30)
    late.join(30)
    assert late_calls == ["UNAVAILABLE"]  # before the fix: queued behind the held batch, DEADLINE_EXCEEDED
    assert [answer.status_code for answer in answers] == [200]


def wait_for_shutdown_begun(url: str, grpc_service: GrpcService, timeout_s: float = 20) -> None:
    """Once uvicorn's shutdown has begun (it no longer takes HTTP connections) and the gRPC server's stop, begun with it
    (service.app.begin_drain), has run its first step, from which on grpc refuses new calls. Polled: a fixed delay can
    pass on a busy machine before uvicorn has even begun to shut down."""
    address = (urlsplit(url).hostname, urlsplit(url).port)
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            socket.create_connection(address, timeout=5).close()
        except ConnectionRefusedError:
            break
        if time.monotonic() > deadline:
            raise TimeoutError(f"the HTTP server still took connections after {timeout_s} s")
        time.sleep(0.01)
    stopping = grpc_service._stopped  # begin_drain runs just before uvicorn stops listening
    if stopping is None:
        raise RuntimeError("the HTTP server's shutdown has begun, the gRPC server's stop has not")
    # Scheduled on the server's loop behind the stop's first step: done, that step has run.
    asyncio.run_coroutine_threadsafe(asyncio.sleep(0), stopping.get_loop()).result(timeout_s)


def test_grpc_port_setting_and_the_cli_prints_the_address(model_repository):
    assert Settings.model_fields["grpc_port"].default == 8001  # Triton's gRPC port
    assert Settings(grpc_port=0).grpc_port == 0  # 0: no gRPC server
    port, http_port = free_port(), free_port()
    command = [sys.executable, "-m", "service", "--repository", str(model_repository), "--host", "127.0.0.1",
               "--port", str(http_port), "--grpc-port", str(port), "--intra-op-threads", "1", "--warmup-runs", "0"]
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        client = triton_grpc.InferenceServerClient(f"127.0.0.1:{port}")
        deadline = time.monotonic() + 60
        while True:
            try:
                if client.is_server_ready():
                    break
            except InferenceServerException:
                pass
            assert process.poll() is None and time.monotonic() < deadline, "the service did not become ready"
            time.sleep(0.2)
    finally:
        process.terminate()
        output, _ = process.communicate(timeout=60)
    assert f"gRPC on 127.0.0.1:{port}" in output
    assert "Application shutdown complete" in output
    assert process.returncode in (0, -signal.SIGTERM)  # uvicorn re-raises the SIGTERM it caught once it is done


def test_a_grpc_port_taken_after_the_cli_checked_it_fails_the_start_with_a_clear_message(model_repository):
    """`python -m service` finds a taken port before the model loads (tests/service/test_startup_errors.py); one taken
    in between fails the start itself, and the lifespan keeps its one-line message for uvicorn's log."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        app = create_app(Settings(repository=str(model_repository), host="127.0.0.1", port=free_port(),
                                  grpc_port=port, intra_op_threads=1, warmup_runs=0))

        async def start() -> None:
            async with app.router.lifespan_context(app):
                pass

        with pytest.raises(RuntimeError, match=f"cannot listen for gRPC on 127.0.0.1:{port}"):
            asyncio.run(start())
    assert app.state.startup_error.startswith(f"cannot listen for gRPC on 127.0.0.1:{port}")
    assert "\n" not in app.state.startup_error
