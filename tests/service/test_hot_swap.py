"""Model hot-swap: a new version is swapped in under load without losing a request; a broken one is refused."""
from __future__ import annotations

import itertools
import shutil
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from runtime.engines.onnxruntime import OnnxRuntimeEngine
from runtime.repository import ModelRepository, now_utc
from service.app import default_engine
from tests.service.conftest import metric

NAME = "atto"


def publish_copy_of(root: Path, source: int, corrupt: bool = False, over: int | None = None) -> int:
    """Publish the next version with the files of `source` (or write them over version `over`, as `export
    --overwrite` does); `corrupt` flips bytes of its model file afterwards."""
    repository = ModelRepository(root)
    original = repository.load(NAME, source)
    with repository.new_version(NAME, over, overwrite=over is not None) as staged:
        for artifact in original.manifest.artifacts:
            shutil.copy(original.artifact_path(artifact), staged.path / artifact.file)
        staged.manifest = original.manifest.model_copy(update={"version": staged.version, "created_at": now_utc()})
    if corrupt:
        model_file = root / NAME / str(staged.version) / original.manifest.artifacts[0].file
        data = bytearray(model_file.read_bytes())
        data[len(data) // 2: len(data) // 2 + 64] = bytes(b ^ 0xFF for b in data[len(data) // 2: len(data) // 2 + 64])
        model_file.write_bytes(bytes(data))
    return staged.version


class NanEngine(OnnxRuntimeEngine):
    """The real engine, with a numerical fault: every logit comes out NaN."""

    def run(self, batch: np.ndarray) -> np.ndarray:
        return np.full_like(super().run(batch), np.nan)


def nan_engine_for(versions: set[int]):
    def build(version, settings):
        engine = default_engine(version, settings)
        if version.manifest.version in versions:
            engine.__class__ = NanEngine
        return engine

    return build


class Client(threading.Thread):
    """Posts real photos back to back until stopped; records every outcome (status, model version) in order."""

    def __init__(self, url: str, photos: list[bytes]):
        super().__init__(daemon=True)
        self.url, self.photos = url, photos
        self.stop = threading.Event()
        self.sent = 0
        self.outcomes: list[tuple[int, int | None]] = []
        self.errors: list[str] = []

    def run(self) -> None:
        with httpx.Client(timeout=60) as client:
            for photo in itertools.cycle(self.photos):
                if self.stop.is_set():
                    return
                self.sent += 1
                try:
                    response = client.post(f"{self.url}/classify", content=photo,
                                           headers={"content-type": "application/octet-stream"})
                except httpx.HTTPError as err:
                    self.errors.append(repr(err))
                    continue
                version = response.json()["model"]["version"] if response.status_code == 200 else None
                self.outcomes.append((response.status_code, version))

    def count(self, version: int) -> int:
        return sum(1 for _, v in self.outcomes if v == version)


def wait_for(condition, what: str, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def served_version(url: str, photo: bytes) -> int:
    response = httpx.post(f"{url}/classify", content=photo, headers={"content-type": "image/jpeg"}, timeout=60)
    assert response.status_code == 200
    return response.json()["model"]["version"]


def test_reload_under_load_loses_no_request_and_refuses_broken_versions(own_repository, real_photos, launch):
    photos = [p.read_bytes() for p in real_photos]
    factory = nan_engine_for(set())
    with launch(own_repository, factory, version=1, max_batch_size=4, max_queue_delay_ms=5) as url:
        clients = [Client(url, photos[i:] + photos[:i]) for i in range(3)]
        for client in clients:
            client.start()
        try:
            wait_for(lambda: all(c.count(1) >= 3 for c in clients), "answers from version 1")
            reload = httpx.post(f"{url}/admin/reload", json={"version": None}, timeout=60)  # null: the latest
            assert reload.status_code == 200, reload.text
            assert reload.json() == {"model": {"name": NAME, "version": 2}, "previous": {"name": NAME, "version": 1}}
            wait_for(lambda: all(c.count(2) >= 3 for c in clients), "answers from version 2")
        finally:
            for client in clients:
                client.stop.set()
            for client in clients:
                client.join(60)
        for client in clients:
            assert client.errors == [] and len(client.outcomes) == client.sent  # every request answered
            assert {status for status, _ in client.outcomes} == {200}
            versions = [v for _, v in client.outcomes]
            assert versions == sorted(versions) and set(versions) == {1, 2}  # v1, then only v2

        corrupt = publish_copy_of(own_repository, 2, corrupt=True)
        refused = httpx.post(f"{url}/admin/reload", json={"version": corrupt}, timeout=60)
        assert refused.status_code == 422 and refused.json()["error"]["code"] == "version_refused"
        message = refused.json()["error"]["message"]
        assert "sha256" in message and "still serving atto/2" in message
        assert served_version(url, photos[0]) == 2

        missing = httpx.post(f"{url}/admin/reload", json={"version": 99}, timeout=60)
        assert missing.status_code == 404 and missing.json()["error"]["code"] == "version_not_found"

        metrics = httpx.get(f"{url}/metrics").text
        assert 'convnext_model_reloads_total{result="ok"} 1.0' in metrics
        assert 'convnext_model_reloads_total{result="refused"} 1.0' in metrics
        info = [line for line in metrics.splitlines() if line.startswith("convnext_model_info{")]
        assert len(info) == 1 and 'version="2"' in info[0]


def test_watcher_refuses_an_engine_with_bad_output_then_serves_the_next_good_version(own_repository, real_photos,
                                                                                     launch):
    photo = real_photos[2].read_bytes()
    bad = 3
    with launch(own_repository, nan_engine_for({bad}), watch_interval_s=0.1) as url:  # the latest, 2
        def watcher_refused_it() -> bool:
            return 'convnext_model_reloads_total{result="refused"} 1.0' in httpx.get(f"{url}/metrics").text

        assert publish_copy_of(own_repository, 2) == bad  # good files, but its engine answers NaN
        wait_for(watcher_refused_it, "the watcher to try and refuse the NaN version")
        assert httpx.get(f"{url}/readyz").status_code == 200 and served_version(url, photo) == 2
        refused = httpx.post(f"{url}/admin/reload", json={"version": bad}, timeout=60)
        assert refused.status_code == 422 and "smoke run" in refused.json()["error"]["message"]

        good = publish_copy_of(own_repository, 2)
        wait_for(lambda: served_version(url, photo) == good, f"the watcher to serve version {good}")
        assert httpx.get(f"{url}/readyz").status_code == 200


def test_watcher_reloads_the_served_version_when_it_is_exported_again_over_itself(own_repository, real_photos,
                                                                                   launch):
    photo = real_photos[2].read_bytes()

    def probabilities(url: str) -> list[float]:
        response = httpx.post(f"{url}/classify", content=photo, headers={"content-type": "image/jpeg"}, timeout=60)
        assert response.status_code == 200 and response.json()["model"]["version"] == 2
        return [entry["probability"] for entry in response.json()["results"][0]["top_k"]]

    def reloads(url: str, result: str = "ok") -> float:
        lines = [line for line in httpx.get(f"{url}/metrics").text.splitlines()
                 if line.startswith(f'convnext_model_reloads_total{{result="{result}"}}')]
        return float(lines[0].split()[-1]) if lines else 0.0

    with launch(own_repository, nan_engine_for({3}), watch_interval_s=0.1) as url:  # the latest, 2
        before = probabilities(url)
        assert publish_copy_of(own_repository, 2) == 3  # a newer version, refused (its engine answers NaN) ...
        wait_for(lambda: reloads(url, "refused") == 1, "the watcher to refuse version 3")
        time.sleep(0.3)  # ... once; a few more polls of an unchanged repository reload nothing
        assert (reloads(url), reloads(url, "refused")) == (0, 1)
        publish_copy_of(own_repository, 1, over=2)  # version 1's weights, published as version 2
        wait_for(lambda: reloads(url) == 1, "the watcher to reload version 2")
        after = probabilities(url)
        time.sleep(0.3)
        assert reloads(url) == 1  # once: the manifest it loaded is the one it serves
    assert after != before


class FailingReads:
    """The repository's versions(), failing the reads of a reload with each of `errors` in turn, as a network volume's
    transient errors would. The watcher's poll reads the versions, then its reload reads them again: of the reads
    that list `version`, every second one is a reload's."""

    def __init__(self, versions, version: int, errors: list[Exception]):
        self.versions, self.version, self.errors = versions, version, errors
        self.reads = 0

    def __call__(self, name: str) -> list[int]:
        found = self.versions(name)
        if self.version in found:
            self.reads += 1
            if self.reads % 2 == 0 and self.errors:
                raise self.errors.pop(0)
        return found


def test_the_watcher_outlives_reloads_that_fail_and_serves_the_new_version_at_a_later_poll(own_repository,
                                                                                          real_photos, launch):
    """An OSError from the repository (counted as unavailable, not as a refused version) and any other error out of a
    reload are each logged, and the watcher polls on: /readyz stays ready (it said "the repository watcher stopped"
    forever)."""
    photo = real_photos[3].read_bytes()
    with launch(own_repository, watch_interval_s=0.1) as url:  # the latest, 2
        repository = url.app.state.service.models.repository
        errors = [OSError(116, "Stale file handle"), RuntimeError("an unexpected error")]
        repository.versions = FailingReads(repository.versions, 3, errors)
        assert publish_copy_of(own_repository, 2) == 3
        wait_for(lambda: served_version(url, photo) == 3, "the watcher to serve version 3 after two failed reloads")
        assert errors == [] and httpx.get(f"{url}/readyz").status_code == 200
        metrics = httpx.get(f"{url}/metrics").text
        assert 'convnext_model_reloads_total{result="unavailable"} 1.0' in metrics
        assert 'convnext_model_reloads_total{result="refused"} 0.0' in metrics
        assert 'convnext_model_reloads_total{result="ok"} 1.0' in metrics


class Holding:
    """Version 1's engine (`factory`, the real one) holding each batch, once `hold` is set, until `release` is set.

    Events of one test's own (the `holding` fixture): none is left set, or set late, for another test's server.
    """

    def __init__(self, version_number: int = 1):
        self.hold, self.release, self.batch_started = threading.Event(), threading.Event(), threading.Event()
        holding = self

        class HoldingEngine(OnnxRuntimeEngine):
            def run(self, batch: np.ndarray) -> np.ndarray:
                if holding.hold.is_set():
                    holding.batch_started.set()
                    holding.release.wait(60)
                return super().run(batch)

        def build(version, settings):
            engine = default_engine(version, settings)
            if version.manifest.version == version_number:
                engine.__class__ = HoldingEngine
            return engine

        self.factory = build


@pytest.fixture()
def holding():
    holding = Holding()
    yield holding
    holding.release.set()  # a failed test leaves no batch waiting


def test_a_reload_while_the_old_engine_hangs_finishes_and_frees_the_next_reload(swap_repository, real_photos, launch,
                                                                                 holding):
    """The old engine's batch hangs while a reload waits for it: the batch times out (504), the reload swaps in the
    new version and answers, and the hung engine is abandoned rather than closed behind the hung call (which held
    the reload's lock forever: every later reload got 409 reload_in_progress)."""
    photo = real_photos[0].read_bytes()
    answers: list[httpx.Response] = []
    # engine_timeout_ms bounds the new version's batches too: 2 s leaves them room for a pause of the machine (the
    # held batch waits that long to time out).
    with launch(swap_repository, holding.factory, version=1, max_batch_size=1, warmup_runs=0,
                engine_timeout_ms=2000) as url:
        holding.hold.set()
        held = threading.Thread(target=lambda: answers.append(httpx.post(
            f"{url}/classify", content=photo, headers={"content-type": "image/jpeg"}, timeout=60)))
        held.start()
        assert holding.batch_started.wait(20)
        reload = httpx.post(f"{url}/admin/reload", json={"version": 2}, timeout=20)
        assert reload.status_code == 200, reload.text
        held.join(20)
        assert answers[0].status_code == 504 and answers[0].json()["error"]["code"] == "engine_timeout"
        again = httpx.post(f"{url}/admin/reload", json={"version": 2}, timeout=20)
        assert again.status_code == 200, again.text
        assert served_version(url, photo) == 2


def test_an_engine_swapped_out_while_its_batch_hangs_is_closed_once_that_call_returns(swap_repository, real_photos,
                                                                                   launch, holding):
    """The batch the swap waits for hits engine_timeout_ms: the old engine stays abandoned, its close is queued behind
    the hung call (never run under it, nor cancelled), and runs once that call returns (TensorRT frees its memory)."""
    photo = real_photos[0].read_bytes()
    with launch(swap_repository, holding.factory, version=1, max_batch_size=1, warmup_runs=0,
                engine_timeout_ms=2000) as url:  # 2 s: as above
        old = url.app.state.service.engine
        holding.hold.set()
        held = threading.Thread(target=lambda: httpx.post(f"{url}/classify", content=photo,
                                                          headers={"content-type": "image/jpeg"}, timeout=60))
        held.start()
        assert holding.batch_started.wait(20)
        assert httpx.post(f"{url}/admin/reload", json={"version": 2}, timeout=20).status_code == 200
        held.join(20)
        assert old.session is not None  # still inside the hung call: not closed under it
        holding.release.set()
        wait_for(lambda: old.session is None, "the old engine to be closed once its hung call returned")
        assert served_version(url, photo) == 2


def test_a_version_with_other_classes_is_refused_a_request_may_span_the_swap(own_repository, launch):
    """A request's images may run on both sides of a swap and get one answer: a version whose classes differ needs a
    restart, like one whose input differs."""
    repository = ModelRepository(own_repository)
    original = repository.load(NAME, 2)
    with repository.new_version(NAME) as staged:
        for artifact in original.manifest.artifacts:
            shutil.copy(original.artifact_path(artifact), staged.path / artifact.file)
        relabelled = tuple(f"class {label}" for label in original.manifest.labels)
        staged.manifest = original.manifest.model_copy(
            update={"version": staged.version, "created_at": now_utc(), "labels": relabelled})
    with launch(own_repository, version=2) as url:
        refused = httpx.post(f"{url}/admin/reload", json={"version": staged.version}, timeout=60)
        assert refused.status_code == 422 and refused.json()["error"]["code"] == "version_refused"
        assert "its classes differ from the served version's" in refused.json()["error"]["message"]


def test_a_v2_request_whose_rows_ran_on_both_sides_of_a_swap_gets_503_not_one_version_for_both(swap_repository,
                                                                                                  launch, holding):
    """A v2 response names one model_version: rows that ran on two versions (a swap between the request's engine
    batches) are refused with 503 version_changed and Retry-After, instead of an answer that says version 1 or 2 for
    logits from both; its rows are not counted in convnext_images_total (they were: counted as their batches ran)."""
    rows = np.random.default_rng(0).standard_normal((2, 3, 64, 64)).astype(np.float32)
    request = {"inputs": [{"name": "input", "shape": list(rows.shape), "datatype": "FP32",
                           "data": rows.reshape(-1).tolist()}]}
    answers: list[httpx.Response] = []
    with launch(swap_repository, holding.factory, version=1, max_batch_size=1, warmup_runs=0) as url:
        counted_before = metric(url, "convnext_images_total")
        holding.hold.set()  # row 0 runs on version 1 and waits there; row 1 stays queued
        infer = threading.Thread(target=lambda: answers.append(httpx.post(
            f"{url}/v2/models/{NAME}/infer", json=request, timeout=60)))
        infer.start()
        assert holding.batch_started.wait(20)
        reload = threading.Thread(target=lambda: httpx.post(f"{url}/admin/reload", json={"version": 2}, timeout=60))
        reload.start()
        batcher = url.app.state.service.batcher
        wait_for(lambda: batcher.served.version == 2, "the swap to version 2")  # row 1 will run on it
        holding.release.set()
        infer.join(30)
        reload.join(30)
        assert answers[0].status_code == 503, answers[0].text
        assert answers[0].json()["code"] == "version_changed" and answers[0].headers["retry-after"] == "1"
        assert metric(url, "convnext_images_total") == counted_before
        again = httpx.post(f"{url}/v2/models/{NAME}/infer", json=request, timeout=60)
        assert again.status_code == 200 and again.json()["model_version"] == "2"
        assert metric(url, "convnext_images_total") == counted_before + 2


def test_a_classify_request_whose_images_ran_on_both_sides_of_a_swap_names_each_ones_version(swap_repository,
                                                                                               real_photos, launch,
                                                                                               holding):
    """/classify may answer across a swap (the versions take the same input and have the same classes): each result
    names the version whose engine ran it; the top-level model is the first result's."""
    files = [("files", (path.name, path.read_bytes(), "image/jpeg")) for path in real_photos[:2]]
    answers: list[httpx.Response] = []
    with launch(swap_repository, holding.factory, version=1, max_batch_size=1, warmup_runs=0) as url:
        holding.hold.set()  # one image runs on version 1 and waits there; the other stays queued
        classify = threading.Thread(target=lambda: answers.append(httpx.post(f"{url}/classify", files=files,
                                                                              timeout=60)))
        classify.start()
        assert holding.batch_started.wait(20)
        reload = threading.Thread(target=lambda: httpx.post(f"{url}/admin/reload", json={"version": 2}, timeout=60))
        reload.start()
        batcher = url.app.state.service.batcher
        wait_for(lambda: batcher.served.version == 2, "the swap to version 2")  # the queued image will run on it
        holding.release.set()
        classify.join(30)
        reload.join(30)
    assert answers[0].status_code == 200, answers[0].text
    answer = answers[0].json()
    assert sorted(result["model"]["version"] for result in answer["results"]) == [1, 2]
    assert {result["model"]["name"] for result in answer["results"]} == {NAME}
    assert answer["model"] == answer["results"][0]["model"]
