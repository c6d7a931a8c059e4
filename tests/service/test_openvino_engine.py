"""The engine contract, run on the real ONNX Runtime and the real OpenVINO runtime alike; OpenVINO's precisions
(bf16 only where the CPU computes it natively) and `python -m service --engine openvino` over HTTP."""
from __future__ import annotations

import os
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest

from runtime.engines.base import EngineError
from runtime.preprocess import preprocess
from service.app import default_engine
from service.settings import Settings
from tests.service.conftest import classify_top1, free_port, wait_ready

ENGINES = ["onnxruntime", "openvino"]
# (engine, performance hint): THROUGHPUT runs several batches at once, each call from its own thread (OpenVINO's
# hint; for ONNX Runtime, ort_streams 2).
CONTRACT = [("onnxruntime", "LATENCY"), ("onnxruntime", "THROUGHPUT"), ("openvino", "LATENCY"),
            ("openvino", "THROUGHPUT")]


def cpu_has_native_bf16() -> bool:
    """From the kernel's CPU flags: AVX512_BF16 or AMX-BF16, what OpenVINO's CPU plugin needs to compute in bf16."""
    flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    return bool({"avx512_bf16", "amx_bf16"} & set(flags.split(":", 1)[1].split()))


def make_engine(version, engine: str, precision: str = "fp32", max_batch_size: int = 4, hint: str = "LATENCY"):
    threads = 2 if hint == "THROUGHPUT" else 1  # THROUGHPUT makes a stream per core: two threads, two streams
    settings = Settings(engine=engine, precision=precision, max_batch_size=max_batch_size, intra_op_threads=threads,
                        openvino_performance_hint=hint, ort_streams=threads if engine == "onnxruntime" else 1)
    return default_engine(version, settings)


@pytest.fixture(scope="module")
def reference(version, photo_batch) -> np.ndarray:
    """ONNX Runtime fp32 logits of the real photos, one image per call."""
    engine = make_engine(version, "onnxruntime")
    engine.load()
    logits = np.concatenate([engine.run(photo_batch[i:i + 1]) for i in range(len(photo_batch))])
    engine.close()
    return logits


@pytest.mark.parametrize("name, hint", CONTRACT,
                         ids=["onnxruntime", "onnxruntime-streams", "openvino", "openvino-throughput"])
def test_engine_contract_load_warmup_run_describe_close(version, name, hint, photo_batch, reference):
    engine = make_engine(version, name, hint=hint)
    with pytest.raises(EngineError, match="not loaded"):
        engine.run(photo_batch[:1])
    engine.load()
    engine.warmup(runs=1)
    spec = engine.describe()
    assert (spec.name, spec.input_shape, spec.max_batch_size, spec.precision, spec.provider) == \
        (name, (3, 64, 64), 4, "fp32", "cpu")
    assert spec.input_name == version.manifest.input.name
    for size in (1, 2, 4):
        logits = engine.run(photo_batch[:size])
        assert logits.shape == (size, 10) and logits.dtype == np.float32 and np.isfinite(logits).all()
        np.testing.assert_allclose(logits, reference[:size], atol=1e-4, rtol=1e-4)
    slots = engine.max_concurrent_batches
    assert spec.max_concurrent_batches == slots
    if hint == "THROUGHPUT" and name == "openvino":  # as many batches in flight as OpenVINO says keep streams busy
        assert slots == int(engine.compiled.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS"))
        assert slots >= min(2, os.cpu_count() or 1)
    elif hint == "THROUGHPUT":  # ort_streams 2: two batches at once on one session, a thread each
        assert slots == 2 and engine.intra_op_threads == 1
    else:
        assert slots == 1
    sizes = [1, 2, 3, 4] * 3
    with ThreadPoolExecutor(slots) as pool:  # the batcher's way: up to `slots` calls at once, each from its thread
        results = list(pool.map(lambda size: engine.run(photo_batch[:size]), sizes))
    for size, logits in zip(sizes, results, strict=True):
        np.testing.assert_allclose(logits, reference[:size], atol=1e-4, rtol=1e-4)
    if name == "openvino":  # its compiled batch dimension is bounded by max_batch_size
        with pytest.raises(EngineError, match="a batch of 5 is over this engine's max_batch_size 4"):
            engine.run(photo_batch[:5])
    engine.close()
    with pytest.raises(EngineError, match="not loaded"):
        engine.run(photo_batch[:1])


@pytest.mark.parametrize("name", ENGINES)
def test_an_image_gets_the_same_logits_whatever_batch_it_rides_in(version, name, photo_batch):
    engine = make_engine(version, name)
    engine.load()
    together = engine.run(photo_batch[:4])
    alone = np.concatenate([engine.run(photo_batch[i:i + 1]) for i in range(4)])
    np.testing.assert_allclose(together, alone, atol=1e-5, rtol=1e-5)
    engine.close()


def test_openvino_fp32_forces_f32_inference_precision(version):
    engine = make_engine(version, "openvino")
    engine.load()
    assert str(engine.compiled.get_property("INFERENCE_PRECISION_HINT")) == "<Type: 'float32'>"
    engine.close()


def test_openvino_bf16_runs_where_the_cpu_has_it_and_is_refused_clearly_elsewhere(version, photo_batch, reference):
    engine = make_engine(version, "openvino", "bf16")
    if not cpu_has_native_bf16():
        with pytest.raises(EngineError, match="no native bf16.*use --precision fp32"):
            engine.load()
        return
    engine.load()
    assert str(engine.compiled.get_property("INFERENCE_PRECISION_HINT")) == "<Type: 'bfloat16'>"
    assert engine.describe().precision == "bf16"
    logits = engine.run(photo_batch[:4])
    assert np.isfinite(logits).all()
    # bf16 keeps 8 bits of mantissa: close to fp32, not equal (tighter bounds on a trained model: README).
    assert 0 < np.abs(logits - reference[:4]).max() < 0.1 * np.abs(reference).max()
    engine.close()


def test_openvino_refuses_fp16_and_a_missing_int8_artifact_with_what_to_do(version):
    with pytest.raises(EngineError, match="not 'fp16'.*--precision fp32"):
        make_engine(version, "openvino", "fp16")
    with pytest.raises(RuntimeError, match=r"no int8 ONNX artifact for OpenVINO int8 \(has \['fp32'\]\)"):
        make_engine(version, "openvino", "int8")


def test_openvino_int8_reads_the_quantized_artifact(tmp_path, real_photos):
    from export.onnx import export_onnx_version

    quantized = export_onnx_version(tmp_path, "atto", "convnext_atto", num_classes=10, input_size=32,
                                    precisions=("fp32", "int8"), verify_images=real_photos)
    engine = make_engine(quantized, "openvino", "int8")
    assert engine.model_path.name == quantized.manifest.find("onnx", "int8").file
    engine.load()
    batch = np.stack([preprocess(p.read_bytes(), quantized.manifest.preprocess, 10**8) for p in real_photos[:4]])
    logits = engine.run(batch)
    assert logits.shape == (4, 10) and np.isfinite(logits).all()
    assert engine.describe().precision == "int8"


def test_python_m_service_engine_openvino_serves_real_photos(model_repository, real_photos, version, reference):
    port = free_port()
    command = [sys.executable, "-m", "service", "--repository", str(model_repository), "--host", "127.0.0.1",
               "--port", str(port), "--engine", "openvino", "--precision", "fp32", "--intra-op-threads", "1",
               "--preprocess-workers", "1"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_ready(url, alive=lambda: process.poll() is None)
        for photo, logits in zip(real_photos, reference, strict=True):
            assert classify_top1(url, photo) == int(np.argmax(logits))
        assert httpx.get(f"{url}/v2/models/atto").json()["platform"] == "openvino"
    finally:
        process.terminate()
        process.wait(30)


@pytest.mark.parametrize("engine_name, overrides", [
    ("openvino", {"openvino_performance_hint": "THROUGHPUT"}), ("onnxruntime", {"ort_streams": 2})],
    ids=["openvino-throughput", "onnxruntime-streams"])
def test_several_batches_in_flight_serve_right(model_repository, launch, version, real_photos, reference,
                                               engine_name, overrides):
    """Over HTTP: the batcher hands the engine a second batch while the first is still running, results stay right."""
    calls = {"armed": False, "count": 0, "running": 0, "most": 0}
    lock, first_two = threading.Lock(), threading.Barrier(2, timeout=10)

    def counting_engine(model, settings):  # the real engine; its run() counts the calls in flight
        engine = default_engine(model, settings)
        real_run = engine.run

        def run(batch):
            with lock:
                calls["running"] += 1
                calls["most"] = max(calls["most"], calls["running"])
                index = calls["count"] if calls["armed"] else None
                calls["count"] += calls["armed"]
            try:
                if index is not None and index < 2:
                    first_two.wait()  # the first two calls once armed meet: the second starts while the first runs
                return real_run(batch)
            finally:
                with lock:
                    calls["running"] -= 1

        engine.run = run
        return engine

    with launch(model_repository, counting_engine, engine=engine_name, intra_op_threads=2, max_batch_size=2,
                max_queue_delay_ms=1, **overrides) as url:
        engine = httpx.get(f"{url}/models").json()["engine"]
        assert engine["name"] == engine_name and engine["max_concurrent_batches"] >= 2
        calls["armed"], calls["most"] = True, 0
        photos = list(zip(real_photos, reference, strict=True)) * 2

        def classify(pair):
            photo, logits = pair
            return classify_top1(url, photo), int(np.argmax(logits))

        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(classify, photos))
    assert all(got == expected for got, expected in answers)
    assert calls["most"] >= 2 and not first_two.broken


def test_onnxruntime_streams_are_cpu_only_and_at_least_one(version):
    from runtime.engines.onnxruntime import OnnxRuntimeEngine

    path = version.artifact_path(version.manifest.find("onnx", "fp32"))
    with pytest.raises(EngineError, match="streams must be 1, or more on the CPU provider only"):
        OnnxRuntimeEngine(path, (3, 64, 64), provider="cuda", streams=2)
    with pytest.raises(EngineError, match="streams must be 1"):
        OnnxRuntimeEngine(path, (3, 64, 64), streams=0)
    engine = make_engine(version, "onnxruntime", hint="THROUGHPUT")  # Settings(intra_op_threads=2, ort_streams=2)
    assert (engine.max_concurrent_batches, engine.intra_op_threads) == (2, 1)


def test_onnxruntime_streams_share_the_sessions_threads_and_use_them_all():
    """One session, one intra-op pool of n - 1 workers, and each running batch's own thread joins in: n is chosen so
    that workers + running batches = the threads asked for (threads // streams left cores idle: 8 / 2 ran 5)."""
    from runtime.engines.factory import ort_intra_op_threads

    for threads, streams in [(1, 1), (2, 1), (2, 2), (8, 2), (16, 4), (4, 4)]:
        pool_workers = ort_intra_op_threads(threads, streams) - 1
        assert pool_workers + streams == threads, (threads, streams)
    assert ort_intra_op_threads(1, 2) == 1  # more streams than threads: still a session


SWAP_THEN_SIGTERM = """
import signal, sys
from service.app import default_engine
from service.settings import Settings
from runtime.repository import ModelRepository
from runtime.signal_stack import current_signal_stack

version = ModelRepository(sys.argv[1]).load(sys.argv[2], int(sys.argv[3]))
settings = Settings(engine="openvino", intra_op_threads=2, openvino_performance_hint=sys.argv[4], max_batch_size=4)
before = current_signal_stack()
served = default_engine(version, settings)
served.load()
swapped_in = default_engine(version, settings)  # a hot swap: the new engine loads before the old one closes
swapped_in.load()
served.close()
swapped_in.close()
print("signal stack kept:", current_signal_stack() == before, flush=True)
signal.signal(signal.SIGTERM, lambda signum, frame: print("SIGTERM handled", flush=True))
signal.raise_signal(signal.SIGTERM)
"""


@pytest.mark.parametrize("hint", ["LATENCY", "THROUGHPUT"])
def test_a_hot_swap_of_openvino_engines_leaves_the_thread_a_signal_stack_it_can_handle_sigterm_on(version, hint):
    """OpenVINO's compile (either hint; LATENCY is the default) installs a signal stack on the calling thread and puts
    back the one it found when the model goes: after two such engines closed in load order, the thread was left with
    the first one's freed stack, and the next SIGTERM its Python handler took (uvicorn's, at a rolling update) killed
    the process with SIGSEGV (exit 139) instead of draining it. Run in a process of its own: a crash must not take the
    test runner down."""
    root, manifest = version.path.parent.parent, version.manifest
    done = subprocess.run([sys.executable, "-c", SWAP_THEN_SIGTERM, str(root), manifest.name, str(manifest.version),
                           hint], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, (done.returncode, done.stdout, done.stderr[-2000:])
    assert done.stdout.splitlines() == ["signal stack kept: True", "SIGTERM handled"]
