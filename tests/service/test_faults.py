"""Queue full, deadlines and engine failures, with real engine subclasses that sleep or fail on cue."""
from __future__ import annotations

import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from itertools import islice

import httpx
import numpy as np

from runtime.engines.onnxruntime import OnnxRuntimeEngine
from service.app import default_engine
from tests.service.conftest import metric


class SlowEngine(OnnxRuntimeEngine):
    """The real ONNX Runtime engine, made slow so the queue fills up."""

    delay_s = 0.5

    def run(self, batch: np.ndarray) -> np.ndarray:
        time.sleep(self.delay_s)
        return super().run(batch)


class FailingEngine(OnnxRuntimeEngine):
    """Fails every batch that holds an all-black image (pixel value -mean/std everywhere)."""

    def run(self, batch: np.ndarray) -> np.ndarray:
        if (batch.reshape(batch.shape[0], -1).max(axis=1) < -1.5).any():  # a black image is below -1.8
            raise RuntimeError("simulated GPU fault")
        return super().run(batch)


def factory(cls):
    def build(version, settings):
        engine = default_engine(version, settings)
        engine.__class__ = cls
        return engine

    return build


def black_png() -> bytes:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (80, 80), (0, 0, 0)).save(buffer, "PNG")
    return buffer.getvalue()


class NanForBlack(OnnxRuntimeEngine):
    """Logits NaN for an all-black image's row only (its batch mates are answered)."""

    def run(self, batch: np.ndarray) -> np.ndarray:
        logits = super().run(batch).copy()
        logits[batch.reshape(batch.shape[0], -1).max(axis=1) < -1.5] = np.nan
        return logits


class Hold:
    """Batches that wait, once `start()` is called, until `finish()`: the slots stay taken for as long as a test
    needs them, however slow the machine (a fixed engine delay let a slot free itself before a test's last request).
    Before start() batches run at once, so the service warms up and becomes ready."""

    def __init__(self):
        self.holding = threading.Event()
        self.released = threading.Event()

        hold = self

        class HeldEngine(OnnxRuntimeEngine):
            def run(self, batch: np.ndarray) -> np.ndarray:
                if hold.holding.is_set():
                    hold.released.wait(timeout=60)
                return super().run(batch)

        self.factory = factory(HeldEngine)

    def start(self) -> None:
        self.holding.set()

    def finish(self, threads: list[threading.Thread]) -> None:
        self.released.set()
        for thread in threads:
            thread.join()


def test_full_queue_answers_503_with_retry_after_at_once(model_repository, real_photos, launch):
    data = real_photos[0].read_bytes()
    hold = Hold()
    with launch(model_repository, hold.factory, max_batch_size=1, queue_size=2, warmup_runs=0) as url:
        def post(_):
            started = time.monotonic()
            response = httpx.post(f"{url}/classify", content=data, headers={"content-type": "image/jpeg"},
                                  timeout=60)
            return response, time.monotonic() - started

        admitted = url.app.state.service.admission.capacity
        hold.start()  # from here on batches wait for the test: a 503 that waited for one (or a slot) waits with it
        with ThreadPoolExecutor(10) as pool:
            posts = [pool.submit(post, i) for i in range(10)]
            try:  # the refused ones answer while every batch is held: no batch can have finished before them
                refused = [done.result() for done in islice(as_completed(posts, timeout=30), 10 - admitted)]
            finally:
                hold.released.set()
            timed = [done.result() for done in posts]
        assert [response.status_code for response, _ in refused] == [503] * (10 - admitted)
        responses = [response for response, _ in timed]
        assert sorted(r.status_code for r in responses) == [200] * admitted + [503] * (10 - admitted)
        rejected = [r for r in responses if r.status_code == 503]
        assert all(r.headers["retry-after"] == "1" and r.json()["error"]["code"] == "queue_full" for r in rejected)
        # At once: typically a few ms. Not timed against the engine, which holds its batches until the test lets them
        # go; the bound leaves room for ten client threads and the server sharing a busy machine.
        refused_s = [seconds for _, seconds in refused]
        assert max(refused_s) < 5, f"503s took {sorted(refused_s)} s"
        assert post(0)[0].status_code == 200  # the service keeps serving
        assert "convnext_rejected_total{reason=\"queue_full\"}" in httpx.get(f"{url}/metrics").text


def test_deadline_gives_504(model_repository, real_photos, launch):
    data = real_photos[0].read_bytes()
    with launch(model_repository, factory(SlowEngine), request_timeout_ms=200, warmup_runs=0) as url:
        response = httpx.post(f"{url}/classify", content=data, headers={"content-type": "image/jpeg"})
        assert response.status_code == 504
        assert response.json()["error"]["code"] == "deadline"


def test_engine_error_fails_only_its_batch(model_repository, real_photos, launch, caplog):
    """The client gets a 500 with an incident id; the engine's own error, under that id, goes to the log only."""
    with launch(model_repository, factory(FailingEngine), warmup_runs=0) as url:
        bad = httpx.post(f"{url}/classify", content=black_png(), headers={"content-type": "image/png"})
        assert bad.status_code == 500
        assert bad.json()["error"]["code"] == "inference_failed"
        message = bad.json()["error"]["message"]
        assert "simulated GPU fault" not in message
        incident = re.fullmatch(r"inference failed on this image's batch \(incident ([0-9a-f]{8}): the service log has "
                                r"the engine's error\)", message).group(1)
        logged = [r.getMessage() for r in caplog.records if f"incident {incident}" in r.getMessage()]
        assert len(logged) == 1 and "simulated GPU fault" in logged[0]
        good = httpx.post(f"{url}/classify", content=real_photos[1].read_bytes(),
                          headers={"content-type": "image/jpeg"})
        assert good.status_code == 200
        assert httpx.get(f"{url}/readyz").status_code == 200


def test_models_answers_503_when_the_repository_does_not_and_holds_few_threads_while_it_hangs(model_repository,
                                                                                               launch, monkeypatch):
    """/models reads every manifest: on a volume that stops answering it answers 503 repository_unavailable past
    its bound, and once `max_reads` reads are stuck, at once (not one more stuck thread per request); an I/O error
    is a 503 too, not a 500."""
    import threading

    from service import routes

    volume_back = threading.Event()
    listing = routes.repository_listing
    with launch(model_repository, warmup_runs=0) as url:
        def unreadable(state):
            raise PermissionError(13, "Permission denied", str(model_repository))

        monkeypatch.setattr(routes, "repository_listing", unreadable)
        denied = httpx.get(f"{url}/models", timeout=30)
        assert denied.status_code == 503 and denied.json()["error"]["code"] == "repository_unavailable"
        message = denied.json()["error"]["message"]
        assert "PermissionError" in message and str(model_repository) not in message  # the path is in the log only

        reader = url.app.state.service.repository_reader
        reader.timeout_s, reader.max_reads = 1.0, 2
        monkeypatch.setattr(routes, "repository_listing", lambda state: volume_back.wait(60) and listing(state))
        try:
            for _ in range(2):
                started = time.monotonic()
                hung = httpx.get(f"{url}/models", timeout=30)
                assert hung.status_code == 503 and hung.headers["retry-after"] == "1", hung.text
                assert "the model repository did not answer within 1 s" in hung.json()["error"]["message"]
                assert time.monotonic() - started >= 1.0
            started = time.monotonic()
            refused = httpx.get(f"{url}/models", timeout=30)
            assert refused.status_code == 503 and refused.json()["error"]["code"] == "repository_unavailable"
            assert "2 earlier reads of the model repository have not returned" in refused.json()["error"]["message"]
            # The message says no read was started (one would have waited its 1 s); the bound, a busy machine's, only
            # catches a wait on something else.
            assert time.monotonic() - started < 5
        finally:
            volume_back.set()
        monkeypatch.setattr(routes, "repository_listing", listing)
        deadline = time.monotonic() + 20
        while (answer := httpx.get(f"{url}/models", timeout=30)).status_code == 503:  # the stuck reads return
            assert time.monotonic() < deadline, answer.text
            time.sleep(0.05)
        assert answer.status_code == 200 and answer.json()["models"], answer.text


def test_a_failed_batch_is_in_the_inference_and_batch_size_histograms(model_repository, launch):
    """Observed with outcome "failed" (only batches the engine answered were observed: a failing engine looked idle)."""
    with launch(model_repository, factory(FailingEngine), warmup_runs=0) as url:
        before = [metric(url, name) for name in ('convnext_inference_seconds_count{outcome="failed"}',
                                                 'convnext_inference_seconds_count{outcome="ok"}',
                                                 "convnext_batch_size_count")]
        answer = httpx.post(f"{url}/classify", content=black_png(), headers={"content-type": "image/png"})
        assert answer.status_code == 500 and answer.json()["error"]["code"] == "inference_failed"
        after = [metric(url, name) for name in ('convnext_inference_seconds_count{outcome="failed"}',
                                                'convnext_inference_seconds_count{outcome="ok"}',
                                                "convnext_batch_size_count")]
        assert [a - b for a, b in zip(after, before, strict=True)] == [1, 0, 1]


def test_an_image_answered_500_for_non_finite_logits_is_not_counted_as_classified(model_repository, launch,
                                                                                  real_photos):
    with launch(model_repository, factory(NanForBlack), warmup_runs=0) as url:
        before = metric(url, "convnext_images_total")
        answer = httpx.post(f"{url}/classify", content=black_png(), headers={"content-type": "image/png"})
        assert answer.status_code == 500 and answer.json()["error"]["code"] == "inference_failed"
        assert metric(url, "convnext_images_total") == before  # (it was counted as classified)
        good = httpx.post(f"{url}/classify", content=real_photos[0].read_bytes(),
                          headers={"content-type": "image/jpeg"})
        assert good.status_code == 200
        assert metric(url, "convnext_images_total") == before + 1
        # Nor its mate in one request: answered 500 with it (the mate was counted as its batch ran)
        files = [("files", ("black.png", black_png(), "image/png")),
                 ("files", ("photo.jpg", real_photos[0].read_bytes(), "image/jpeg"))]
        both = httpx.post(f"{url}/classify", files=files)
        assert both.status_code == 500 and both.json()["error"]["code"] == "inference_failed"
        assert metric(url, "convnext_images_total") == before + 1
