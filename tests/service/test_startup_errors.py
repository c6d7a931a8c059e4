"""`python -m service` refuses what it cannot serve before anything starts (one line, no model loaded), and a start
that still fails (an engine that will not load, or whose build hangs past its bound) ends in one line too, never a
traceback."""
from __future__ import annotations

import asyncio
import hashlib
import json
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from runtime.engines.onnxruntime import OnnxRuntimeEngine
from service.app import STARTUP_ERRORS, default_engine
from service.engine_builds import BuildTimeoutError
from service.metrics import ServiceMetrics
from service.model_manager import ModelManager
from service.settings import Settings
from tests.service.conftest import free_port

ROOT = Path(__file__).resolve().parents[2]

# (flags, a phrase of the one line, exit status); every case is refused before the model is loaded.
REFUSED = [
    (["--precision", "int8"], "atto/1 has no int8 ONNX artifact (has ['fp32'])", 1),
    (["--precision", "bf16"], "ONNX Runtime's CPU provider has no bfloat16 Conv kernel", 1),
    (["--engine", "tensorrt"], "--engine tensorrt: TensorRT is not installed", 1),
    (["--engine", "tensorrt", "--precision", "int8"], "--engine tensorrt builds fp32/fp16/bf16 engines, not int8", 1),
    (["--engine", "tensorrt", "--max-batch-size", "5000"], "1 <= min <= opt <= max <= 4096", 1),
    (["--provider", "cuda"], "CUDAExecutionProvider is not in this onnxruntime build", 1),
    (["--engine", "openvino", "--precision", "fp16"], "the OpenVINO engine runs precision fp32/bf16/int8", 1),
    (["--engine", "openvino", "--provider", "cuda"], "the OpenVINO engine runs on the CPU, not provider 'cuda'", 1),
    (["--engine", "openvino", "--ort-streams", "2"], "--ort-streams 2 is ONNX Runtime's", 1),
    (["--engine", "auto", "--precision", "int8"], "engine auto chooses between fp32 CPU engines", 1),
    (["--ort-streams", "2", "--provider", "cuda"], "ONNX Runtime streams must be 1", 1),
    (["--grpc-port", "{port}"], "port and grpc_port are both", 2),
    (["--max-body-bytes", "200000000"], "max_buffered_body_bytes (268435456) is under twice max_body_bytes", 2),
]


def serve(*flags: str, timeout_s: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "service", *flags], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout_s)


def assert_one_line(result: subprocess.CompletedProcess, phrase: str, status: int) -> str:
    output = result.stdout + result.stderr
    assert result.returncode == status, output
    assert "Traceback" not in output, output
    errors = [line for line in output.splitlines() if "python -m service: error: " in line]
    assert len(errors) == 1 and phrase in errors[0], output
    return errors[0]


@pytest.mark.parametrize(("flags", "phrase", "status"), REFUSED, ids=[" ".join(f) for f, _, _ in REFUSED])
def test_settings_it_cannot_serve_are_refused_in_one_line_before_the_model_loads(model_repository, flags, phrase,
                                                                                  status):
    port = free_port()
    result = serve("--repository", str(model_repository), "--host", "127.0.0.1", "--port", str(port),
                   *[flag.format(port=port) for flag in flags])
    assert_one_line(result, phrase, status)
    assert "Waiting for application startup" not in result.stderr  # nothing was started


@pytest.mark.parametrize("taken", ["HTTP", "gRPC"])
def test_a_taken_port_is_named_before_the_model_loads(model_repository, taken):
    http_port, grpc_port = free_port(), free_port()
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", http_port if taken == "HTTP" else grpc_port))
        holder.listen()
        result = serve("--repository", str(model_repository), "--host", "127.0.0.1", "--port", str(http_port),
                       "--grpc-port", str(grpc_port))
    flag = "--port" if taken == "HTTP" else "--grpc-port"
    line = assert_one_line(result, f"the {taken} port 127.0.0.1:", 3)
    assert f"pass {flag} with a free port" in line


def test_an_engine_that_fails_to_load_at_start_is_one_line_too(model_repository, tmp_path):
    """A version whose files are intact by their hashes but whose ONNX model ONNX Runtime cannot read: only the
    start itself finds out; uvicorn then logs one line and the process exits with its start-up failure status."""
    version = tmp_path / "models" / "atto" / "1"
    shutil.copytree(model_repository / "atto" / "1", version, ignore=shutil.ignore_patterns(".lock"))
    garbage = b"not an ONNX model" * 64
    (version / "model.onnx").write_bytes(garbage)
    manifest = json.loads((version / "manifest.json").read_text())
    manifest["artifacts"][0].update(sha256=hashlib.sha256(garbage).hexdigest(), size_bytes=len(garbage))
    (version / "manifest.json").write_text(json.dumps(manifest))
    result = serve("--repository", str(tmp_path / "models"), "--host", "127.0.0.1", "--port", str(free_port()),
                   "--grpc-port", str(free_port()))
    line = assert_one_line(result, "ONNX Runtime could not load", 3)
    assert "model.onnx" in line
    assert "Application startup failed" in result.stderr



class WedgedLoad(OnnxRuntimeEngine):
    """The real engine, whose load waits for `device_back` as a wedged device's would; it records its close."""

    device_back: threading.Event
    closed = False

    def load(self) -> None:
        self.device_back.wait(60)
        super().load()

    def close(self) -> None:
        self.closed = True
        super().close()


def test_a_first_engine_build_that_hangs_ends_the_start_past_the_bound_a_rebuild_has(model_repository):
    """The start's build is bounded as a reload's and a rebuild's are (build_timeout_s): past it the start fails with
    an error the lifespan reports in one line (STARTUP_ERRORS), and the engine is closed if its load ever returns."""
    device_back, engines = threading.Event(), []

    def wedged(version, settings):
        engine = default_engine(version, settings)
        engine.__class__, engine.device_back = WedgedLoad, device_back
        engines.append(engine)
        return engine

    settings = Settings(repository=str(model_repository), warmup_runs=0, intra_op_threads=1)
    manager = ModelManager(settings, ServiceMetrics(), wedged)
    manager.build_limit_s = 1.0  # the test's bound; build_timeout_s(settings) allows minutes
    try:
        with pytest.raises(BuildTimeoutError) as raised:
            asyncio.run(manager.start())
        assert str(raised.value) == ("the first engine build did not finish within 1 s (a wedged device?); it is "
                                     "abandoned")
        assert isinstance(raised.value, STARTUP_ERRORS) and manager.current is None
    finally:
        device_back.set()
    deadline = time.monotonic() + 30
    while not engines[0].closed:  # its load returned: the abandoned engine is closed
        assert time.monotonic() < deadline, "the abandoned engine was never closed"
        time.sleep(0.05)
