"""Engine auto on the real runtimes: it measures ONNX Runtime fp32 and OpenVINO fp32, serves the faster, shows both
figures (log, engine description, /models), and serves correctly over HTTP."""
from __future__ import annotations

import logging
import time

import httpx
import numpy as np
import pytest

from runtime.engines.auto import AutoEngine, busy_window_images_per_s, measure_images_per_s
from runtime.engines.base import Engine, EngineError
from runtime.engines.factory import EngineOptions, onnxruntime_engine, open_engine, openvino_engine
from runtime.engines.onnxruntime import OnnxRuntimeEngine
from runtime.engines.openvino import OpenVinoEngine
from tests.service.conftest import classify_top1
from tests.service.test_engine_health import (
    GatedFactory,
    black_png,
    holds_black_image,
    post,
    wait_for_status,
    wait_until_ready,
)


@pytest.fixture(scope="module")
def reference(version, photo_batch) -> np.ndarray:
    engine = open_engine(version, EngineOptions())
    engine.load()
    logits = np.concatenate([engine.run(photo_batch[i:i + 1]) for i in range(len(photo_batch))])
    engine.close()
    return logits


def test_auto_measures_both_fp32_engines_serves_the_faster_and_says_so(version, photo_batch, reference, caplog):
    engine = open_engine(version, EngineOptions(engine="auto", max_batch_size=4, auto_measure_s=0.4))
    with caplog.at_level(logging.INFO, logger="convnext.runtime"):
        engine.load()
    spec = engine.describe()
    figures = spec.auto_images_per_s
    assert set(figures) == {"onnxruntime", "openvino"} and all(rate > 0 for rate in figures.values())
    assert spec.name == engine.chosen_name == max(figures, key=figures.get)
    assert (spec.precision, spec.provider, spec.max_batch_size) == ("fp32", "cpu", 4)
    assert f"engine auto chose {spec.name}" in caplog.text
    assert all(f"{name} {rate:.1f}" in caplog.text for name, rate in figures.items())
    engine.warmup(1)
    np.testing.assert_allclose(engine.run(photo_batch[:4]), reference[:4], atol=1e-4, rtol=1e-4)
    engine.close()
    with pytest.raises(EngineError, match="not loaded"):
        engine.run(photo_batch[:1])
    engine.load()  # the interface's load after close: measured and loaded again, not the closed engine handed back
    np.testing.assert_allclose(engine.run(photo_batch[:1]), reference[:1], atol=1e-4, rtol=1e-4)
    engine.close()


def test_a_candidate_that_does_not_load_is_left_out_and_none_loading_is_an_error(version, tmp_path, caplog):
    options = EngineOptions(max_batch_size=2)
    missing = lambda: OpenVinoEngine(tmp_path / "missing.onnx", (3, 64, 64), max_batch_size=2)  # noqa: E731
    engine = AutoEngine({"onnxruntime": lambda: onnxruntime_engine(version, options), "openvino": missing}, 0.1)
    with caplog.at_level(logging.WARNING, logger="convnext.runtime"):
        engine.load()
    assert engine.describe().name == "onnxruntime" and set(engine.describe().auto_images_per_s) == {"onnxruntime"}
    assert "leaving out openvino" in caplog.text
    engine.close()
    with pytest.raises(EngineError, match="no candidate engine loaded"):
        AutoEngine({"openvino": missing}, 0.1).load()


@pytest.mark.parametrize("provider, precision", [("cuda", "fp32"), ("cpu", "bf16")])
def test_auto_refuses_what_it_does_not_choose_between_and_says_what_to_pass(version, provider, precision):
    with pytest.raises(EngineError, match="fp32 CPU engines.*--engine openvino --precision bf16"):
        open_engine(version, EngineOptions(engine="auto", provider=provider, precision=precision))


def test_engine_auto_serves_real_photos_and_shows_both_figures(model_repository, launch, real_photos, reference):
    with launch(model_repository, engine="auto", max_batch_size=4) as url:
        engine = httpx.get(f"{url}/models").json()["engine"]
        figures = engine["auto_images_per_s"]
        assert set(figures) == {"onnxruntime", "openvino"} and engine["name"] == max(figures, key=figures.get)
        for photo, logits in zip(real_photos, reference, strict=True):
            assert classify_top1(url, photo) == int(np.argmax(logits))


class FailsWhenMeasured(Engine):
    """A real engine that loads and warms up, then fails every batch (a device lost after start-up, say)."""

    def __init__(self, inner: Engine):
        self.inner, self.closed = inner, False

    def load(self) -> None:
        self.inner.load()

    def warmup(self, runs: int = 2) -> None:
        self.inner.warmup(runs)

    def run(self, batch: np.ndarray) -> np.ndarray:
        raise EngineError("device lost")

    def describe(self):
        return self.inner.describe()

    def close(self) -> None:
        self.inner.close()
        self.closed = True


def test_a_candidate_that_fails_while_measured_is_left_out(version, caplog):
    options = EngineOptions(max_batch_size=2)
    failing = FailsWhenMeasured(onnxruntime_engine(version, options))
    engine = AutoEngine({"openvino": lambda: failing, "onnxruntime": lambda: onnxruntime_engine(version, options)},
                        0.1)
    with caplog.at_level(logging.WARNING, logger="convnext.runtime"):
        engine.load()
    assert engine.describe().name == "onnxruntime" and set(engine.describe().auto_images_per_s) == {"onnxruntime"}
    assert "leaving out openvino, it failed while measured" in caplog.text and failing.closed
    engine.close()
    with pytest.raises(EngineError, match="every candidate failed while measured"):
        AutoEngine({"openvino": lambda: FailsWhenMeasured(onnxruntime_engine(version, options))}, 0.1).load()


class OnnxRuntimeErrorWhenMeasured(OnnxRuntimeEngine):
    """The real ONNX Runtime engine, which loads and warms up, then hands ONNX Runtime images of the wrong height: its
    InvalidArgument derives from Exception, not RuntimeError or EngineError."""

    warmed_up = False

    def warmup(self, runs: int = 2) -> None:
        super().warmup(runs)
        self.warmed_up = True

    def run(self, batch: np.ndarray) -> np.ndarray:
        return super().run(batch[:, :, :32] if self.warmed_up else batch)


class OnnxRuntimeErrorWhenWarmedUp(OnnxRuntimeErrorWhenMeasured):
    warmed_up = True  # wrong from the first batch on


@pytest.mark.parametrize("engine_class, left_out_as", [(OnnxRuntimeErrorWhenMeasured, "it failed while measured"),
                                                       (OnnxRuntimeErrorWhenWarmedUp, "it did not load")])
def test_a_candidate_failing_with_an_onnxruntime_error_is_left_out(version, caplog, engine_class, left_out_as):
    options = EngineOptions(max_batch_size=2)
    failing = onnxruntime_engine(version, options)
    failing.__class__ = engine_class
    engine = AutoEngine({"onnxruntime": lambda: failing, "openvino": lambda: openvino_engine(version, options)}, 0.1)
    with caplog.at_level(logging.WARNING, logger="convnext.runtime"):
        engine.load()
    assert engine.describe().name == "openvino" and set(engine.describe().auto_images_per_s) == {"openvino"}
    assert f"leaving out onnxruntime, {left_out_as} (InvalidArgument" in caplog.text
    assert failing.session is None  # closed
    engine.close()


def test_a_closed_auto_engine_still_describes_the_engine_it_chose(version):
    """The service describes its engine while rebuilding a closed one (/models, model metadata, the model_info
    metric); load() after close measures again and describes anew."""
    engine = open_engine(version, EngineOptions(engine="auto", max_batch_size=2, auto_measure_s=0.1))
    engine.load()
    loaded = engine.describe()
    engine.close()
    assert engine.describe() == loaded and loaded.auto_images_per_s
    with pytest.raises(EngineError, match="not loaded"):
        AutoEngine({"onnxruntime": lambda: open_engine(version, EngineOptions())}, 0.1).describe()


class PoisonedAutoEngine(AutoEngine):
    """Engine auto failing every batch once it has seen a black image (a device fault); a rebuilt one is healthy."""

    poisoned = False

    def run(self, batch: np.ndarray) -> np.ndarray:
        self.poisoned = self.poisoned or holds_black_image(batch)
        if self.poisoned:
            raise RuntimeError("simulated sticky device fault")
        return super().run(batch)


def test_an_auto_engine_closed_for_a_rebuild_is_still_described_and_the_rebuild_completes(model_repository, launch):
    """/models and the v2 model metadata describe the closed engine while its rebuild waits (they answered 500), and
    the rebuild ends without an error (it raised describing the closed engine, after the swap)."""
    build = GatedFactory(PoisonedAutoEngine)
    try:
        with launch(model_repository, build, engine="auto", max_batch_size=2, engine_max_consecutive_failures=1,
                    warmup_runs=0) as url:
            broken = url.app.state.service.engine
            assert post(url, black_png(), "image/png").status_code == 500  # broken: closed, and rebuilt
            wait_for_status(url, "/readyz", 503)
            deadline = time.monotonic() + 20
            while broken.chosen is not None:  # closed on its thread
                assert time.monotonic() < deadline, "the broken engine was never closed"
                time.sleep(0.05)
            models = httpx.get(f"{url}/models")
            assert models.status_code == 200 and models.json()["engine"]["name"] == broken.chosen_name
            assert httpx.get(f"{url}/v2/models/atto").status_code == 200
            build.rebuild.set()
            wait_until_ready(url)
            recovery = url.app.state.service.models._recovery
            while not recovery.done():
                assert time.monotonic() < deadline + 60, "the recovery never ended"
                time.sleep(0.05)
            assert recovery.exception() is None
            info = [line for line in httpx.get(f"{url}/metrics").text.splitlines()
                    if line.startswith("convnext_model_info{")]
            assert len(info) == 1 and 'version="1"' in info[0]
    finally:
        build.open()


def test_batches_in_flight_are_counted_while_every_thread_is_busy():
    # Two independent streams of 1 s batches (batch 8): 16 images/s. All 6 batches over the 3 s until both stopped
    # would also give 16 here, but not with uneven tails; the busy window (1 s to 3 s) holds 4 batches.
    assert busy_window_images_per_s([[1.0, 2.0, 3.0], [1.0, 2.0, 3.0]], 8, started=0.0) == pytest.approx(16.0)
    # Uneven tails: stream A ran to 2.0, stream B to 2.25 (1 s and 1.125 s batches): counted from 1.125 to 2.0, A's
    # batch at 2.0 (8 images in 0.875 s), not B's at 2.25, when A no longer ran.
    assert busy_window_images_per_s([[1.0, 2.0], [1.125, 2.25]], 8, started=0.0) == pytest.approx(8 / 0.875)
    # Calls queued behind one another inside the engine (0.7 s each, one at a time): 8 / 0.7 = 11.4 images/s. Each
    # thread's own rate (8 / 1.4 per thread, summed) would give 22.9; the busy window gives the true rate.
    assert busy_window_images_per_s([[0.7, 2.1], [1.4, 2.8]], 8, started=0.0) == pytest.approx(8 / 0.7)
    # One thread: its batches after the first, over first to last.
    assert busy_window_images_per_s([[0.5, 1.0, 1.5]], 4, started=0.0) == pytest.approx(8.0)
    # No batch inside the window (a thread done before the other's first): everything over the whole run.
    assert busy_window_images_per_s([[0.1, 0.2], [0.5, 0.6]], 8, started=0.0) == pytest.approx(32 / 0.6)


def test_a_real_engine_with_two_streams_is_measured_from_every_thread(version):
    engine = onnxruntime_engine(version, EngineOptions(max_batch_size=2, threads=2, ort_streams=2))
    engine.load()
    batch = np.zeros((2, *engine.describe().input_shape), dtype=np.float32)
    try:
        assert engine.max_concurrent_batches == 2 and measure_images_per_s(engine, batch, 0.2) > 0
        assert measure_images_per_s(engine, batch, 0.0) > 0  # past its deadline, each thread still runs two
    finally:
        engine.close()
