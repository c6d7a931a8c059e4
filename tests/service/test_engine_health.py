"""Engine health: a hung or repeatedly failing engine is detected, /readyz says why, and a rebuilt engine serves;
an engine that cannot be rebuilt fails liveness, as does a rebuild that hangs past its bound; a rebuild sees what
earlier builds added to the version.

The engines are the real ONNX Runtime engine, subclassed to hang or fail on an all-black image (the cue); the
factory holds every rebuild until the test has seen the broken state, so nothing depends on timing.
"""
from __future__ import annotations

import shutil
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from runtime.engines.base import EngineError
from runtime.engines.factory import OPEN_BOUND_S
from runtime.engines.onnxruntime import OnnxRuntimeEngine
from runtime.repository import ModelRepository, TensorRTInfo, describe_file
from runtime.tensorrt import BUILD_LOCK_TIMEOUT_S
from service.app import default_engine
from service.engine_builds import build_timeout_s
from service.repository_reader import RepositoryStuck
from service.settings import Settings
from tests.service.conftest import metric


def black_png() -> bytes:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (80, 80), (0, 0, 0)).save(buffer, "PNG")
    return buffer.getvalue()


def holds_black_image(batch: np.ndarray) -> bool:
    return bool((batch.reshape(batch.shape[0], -1).max(axis=1) < -1.5).any())  # a black image is below -1.8


class HangingEngine(OnnxRuntimeEngine):
    """A batch holding a black image blocks until `release` is set, as a stuck GPU call would."""

    release: threading.Event

    def run(self, batch: np.ndarray) -> np.ndarray:
        if holds_black_image(batch):
            self.release.wait(60)
        return super().run(batch)


class PoisonedEngine(OnnxRuntimeEngine):
    """Once it has seen a black image every batch fails, as a GPU left in an error state; a new one is healthy."""

    poisoned = False

    def run(self, batch: np.ndarray) -> np.ndarray:
        self.poisoned = self.poisoned or holds_black_image(batch)
        if self.poisoned:
            raise RuntimeError("simulated sticky GPU fault")
        return super().run(batch)


class GatedFactory:
    """The service's own engine factory with the engine class swapped; builds after the first wait for `rebuild`."""

    def __init__(self, engine_class, failing_rebuilds: int = 0):
        self.engine_class = engine_class
        self.failing_rebuilds = failing_rebuilds  # rebuilds that raise, as a device still resetting would
        self.builds = 0
        self.rebuild = threading.Event()
        self.release = threading.Event()

    def __call__(self, version, settings):
        self.builds += 1
        if self.builds > 1:
            self.rebuild.wait(60)
            self.check_rebuild()
        engine = default_engine(version, settings)
        engine.__class__ = self.engine_class
        engine.release = self.release
        return engine

    def check_rebuild(self):
        """Raise for the first `failing_rebuilds` rebuilds."""
        if self.builds <= 1 + self.failing_rebuilds:
            raise EngineError("simulated: the device is still resetting")

    def open(self):
        self.rebuild.set()
        self.release.set()


def post(url: str, data: bytes, content_type: str) -> httpx.Response:
    return httpx.post(f"{url}/classify", content=data, headers={"content-type": content_type}, timeout=60)


def wait_for_status(url: str, path: str, status: int, timeout_s: float = 30) -> httpx.Response:
    deadline = time.monotonic() + timeout_s
    while (response := httpx.get(f"{url}{path}")).status_code != status:
        if time.monotonic() > deadline:
            raise AssertionError(f"{path} still answers {response.status_code} after {timeout_s} s: {response.text}")
        time.sleep(0.05)
    return response


def wait_until_ready(url: str) -> None:
    wait_for_status(url, "/readyz", 200)


def assert_broken_then_recovers(url: str, build: GatedFactory, reason: str, photo: bytes) -> None:
    """Broken: /readyz and /classify say why; once rebuilds may go ahead, a new engine (after any failed
    rebuilds, retried) serves version 1 again."""
    readyz = httpx.get(f"{url}/readyz")
    assert readyz.status_code == 503
    assert readyz.json()["status"] == "not_ready" and reason in readyz.json()["reason"]
    assert httpx.get(f"{url}/v2/health/ready").status_code == 503
    refused = post(url, photo, "image/jpeg")
    assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
    assert refused.json()["error"]["code"] == "not_ready" and reason in refused.json()["error"]["message"]
    assert "convnext_ready 0.0" in httpx.get(f"{url}/metrics").text
    busy = httpx.post(f"{url}/admin/reload", json={"version": 1}, timeout=30)  # the rebuild holds the model
    assert busy.status_code == 409 and busy.json()["error"]["code"] == "reload_in_progress"
    build.rebuild.set()  # let the service build its new engine
    wait_until_ready(url)
    served = post(url, photo, "image/jpeg")
    assert served.status_code == 200 and served.json()["model"]["version"] == 1
    metrics = httpx.get(f"{url}/metrics").text
    assert f'convnext_engine_restarts_total{{reason="{reason}"}} 1.0' in metrics
    assert "convnext_ready 1.0" in metrics
    assert build.builds == 2 + build.failing_rebuilds


def test_hung_engine_times_out_goes_not_ready_and_is_rebuilt_without_restart(model_repository, real_photos, launch):
    build = GatedFactory(HangingEngine)
    photo = real_photos[0].read_bytes()
    try:
        with launch(model_repository, build, engine_timeout_ms=2000, warmup_runs=0) as url:
            assert post(url, photo, "image/jpeg").status_code == 200
            hung = post(url, black_png(), "image/png")  # the request deadline is 30 s: the watchdog answers first
            assert hung.status_code == 504
            assert hung.json()["error"]["code"] == "engine_timeout" and "2000 ms" in hung.json()["error"]["message"]
            assert_broken_then_recovers(url, build, "engine_timeout", photo)
    finally:
        build.open()  # end the abandoned call


def test_engine_failing_batch_after_batch_is_rebuilt_retrying_a_failed_rebuild(model_repository, real_photos,
                                                                              launch):
    build = GatedFactory(PoisonedEngine, failing_rebuilds=1)
    photo = real_photos[1].read_bytes()
    try:
        with launch(model_repository, build, engine_max_consecutive_failures=2, warmup_runs=0) as url:
            first = post(url, black_png(), "image/png")
            assert first.status_code == 500 and first.json()["error"]["code"] == "inference_failed"
            assert httpx.get(f"{url}/readyz").status_code == 200  # one failed batch is that batch's problem only
            second = post(url, photo, "image/jpeg")
            assert second.status_code == 500 and "incident" in second.json()["error"]["message"]
            assert_broken_then_recovers(url, build, "consecutive_failures", photo)
    finally:
        build.open()


class RebuildsFailUntilHealed(GatedFactory):
    """The service's factory serving a PoisonedEngine; rebuilds wait for `rebuild`, then fail until `heal` is set,
    as on a GPU left in a sticky error state until the container restarts."""

    def __init__(self):
        super().__init__(PoisonedEngine)
        self.heal = threading.Event()

    def check_rebuild(self):
        if not self.heal.is_set():
            raise EngineError("simulated: the GPU is in a sticky error state")


def test_healthz_fails_after_the_engine_could_not_be_rebuilt_k_times_and_recovers_with_it(model_repository, launch):
    build = RebuildsFailUntilHealed()
    try:
        with launch(model_repository, build, engine_max_consecutive_failures=1, engine_max_rebuild_attempts=2,
                    warmup_runs=0) as url:
            assert post(url, black_png(), "image/png").status_code == 500  # the engine is now broken
            assert httpx.get(f"{url}/readyz").status_code == 503
            assert httpx.get(f"{url}/healthz").status_code == 200  # broken, but no rebuild has failed yet
            build.rebuild.set()  # rebuilds go ahead, and fail
            dead = wait_for_status(url, "/healthz", 503)
            error = dead.json()["error"]
            assert error["code"] == "engine_unrecoverable"
            assert "2 attempts" in error["message"] and "last error: EngineError (incident " in error["message"]
            assert "sticky error state" not in error["message"]  # the error's own words are in the log only
            assert "engine_max_rebuild_attempts=2" in error["message"]
            assert httpx.get(f"{url}/v2/health/live").status_code == 503  # KServe v2 liveness says the same
            # The first build and two failed rebuilds at least: liveness waits for the limit ("2 attempts" above).
            # Maybe more: the retries go on, the next 2 s after the second failure, which a busy machine can take to
            # get here.
            assert build.builds >= 3
            build.heal.set()  # a rebuild that works (the retries go on) makes the replica live and ready again
            wait_until_ready(url)
            assert httpx.get(f"{url}/healthz").json() == {"status": "ok"}
            assert httpx.get(f"{url}/v2/health/live").json() == {"live": True}
    finally:
        build.rebuild.set()
        build.heal.set()


ENGINE_FILE = "engines/model.fp32.trt10.13.0.sm90-h100.b1-8-8.engine"


class AddsAnEngineOnFirstBuild:
    """The service's factory serving a PoisonedEngine; its first build adds an engine file to the version the way
    runtime.tensorrt.select_or_build_engine does (ModelRepository.add_artifact). Records the artifacts it is given."""

    def __init__(self):
        self.artifacts_seen: list[tuple[str, ...]] = []

    def __call__(self, version, settings):
        self.artifacts_seen.append(tuple(a.file for a in version.manifest.artifacts))
        if len(self.artifacts_seen) == 1:
            with tempfile.TemporaryDirectory() as tmp:
                staged = Path(tmp) / "model.engine"
                staged.write_bytes(b"a serialized engine")
                info = TensorRTInfo(tensorrt_version="10.13.0", compute_capability="9.0", device_name="H100",
                                    min_batch=1, opt_batch=8, max_batch=8)
                artifact = describe_file(Path(tmp), staged.name, format="tensorrt", precision="fp32",
                                         tensorrt=info).model_copy(update={"file": ENGINE_FILE})
                ModelRepository(settings.repository).add_artifact(version.manifest.name, version.manifest.version,
                                                                  staged, artifact)
        engine = default_engine(version, settings)
        engine.__class__ = PoisonedEngine
        return engine


def test_a_rebuild_sees_the_artifact_an_earlier_build_added_and_serves_that_version(model_repository, tmp_path,
                                                                                  launch):
    repository = tmp_path / "models"
    shutil.copytree(model_repository, repository)  # the first build writes into the version
    build = AddsAnEngineOnFirstBuild()
    with launch(repository, build, engine_max_consecutive_failures=1, warmup_runs=0) as url:
        served = url.app.state.service.version  # the version the engine runs: with the engine the build added
        assert ENGINE_FILE in [a.file for a in served.manifest.artifacts]
        assert post(url, black_png(), "image/png").status_code == 500  # breaks the engine: recovery rebuilds it
        wait_until_ready(url)
    first, rebuilt = build.artifacts_seen
    assert ENGINE_FILE not in first
    assert ENGINE_FILE in rebuilt  # re-read from the repository, not the version the first build was handed


class WedgedRebuilds:
    """The service's factory serving a HangingEngine; every rebuild blocks in the factory until `release` is set, as
    a load on a wedged GPU would (none returns by itself). Keeps every engine it makes."""

    def __init__(self):
        self.release = threading.Event()
        self.engines: list[OnnxRuntimeEngine] = []

    def __call__(self, version, settings):
        if self.engines:
            self.release.wait(60)
        engine = default_engine(version, settings)
        engine.__class__ = HangingEngine
        engine.release = self.release
        self.engines.append(engine)
        return engine


def test_a_rebuild_that_hangs_fails_past_its_bound_counts_toward_liveness_and_its_engines_are_closed_later(
        model_repository, launch):
    build = WedgedRebuilds()
    try:
        with launch(model_repository, build, engine_timeout_ms=500, engine_max_rebuild_attempts=2,
                    warmup_runs=0) as url:
            manager = url.app.state.service.models
            manager.build_limit_s = 1.0  # the test's bound; build_timeout_s(settings) allows minutes
            assert post(url, black_png(), "image/png").status_code == 504  # the engine hangs: rebuilds begin
            dead = wait_for_status(url, "/healthz", 503, timeout_s=20)  # two attempts, each abandoned after 1 s
            message = dead.json()["error"]["message"]
            assert "2 attempts" in message and "did not finish within 1 s" in message
            busy = httpx.post(f"{url}/admin/reload", json={"version": 1}, timeout=30)
            assert busy.status_code == 409  # rebuilds go on, one at a time
            manager.build_limit_s = 60.0
            build.release.set()  # the device recovers: the hung calls return, a rebuild succeeds
            wait_until_ready(url)
            assert httpx.get(f"{url}/healthz").json() == {"status": "ok"}
            serving = manager.current.engine
            deadline = time.monotonic() + 20
            while any(e.session is not None for e in build.engines if e is not serving):  # hung, and built too late
                assert time.monotonic() < deadline, "an abandoned engine was never closed"
                time.sleep(0.05)
            assert len(build.engines) >= 3 and serving.session is not None
    finally:
        build.release.set()


def test_a_reload_whose_build_hangs_is_refused_past_the_bound_and_frees_the_next_reload(model_repository, launch):
    """/admin/reload builds its engine under the same bound as a rebuild: a build that hangs (a wedged device) is
    refused once past it, the version is still served, the next reload is not told one is in progress, and the
    abandoned engine is closed once its load returns."""
    build = WedgedRebuilds()
    try:
        with launch(model_repository, build, warmup_runs=0) as url:
            manager = url.app.state.service.models
            manager.build_limit_s = 1.0
            started = time.monotonic()
            refused = httpx.post(f"{url}/admin/reload", json={"version": 1}, timeout=30)
            assert refused.status_code == 422, refused.text
            assert "the reload did not finish within 1 s (a wedged device?)" in refused.json()["error"]["message"]
            assert 1.0 <= time.monotonic() - started < 10
            assert httpx.get(f"{url}/readyz").status_code == 200  # still serving the version it had
            again = httpx.post(f"{url}/admin/reload", json={"version": 1}, timeout=30)
            assert again.status_code == 422, again.text  # not 409 reload_in_progress: the lock was given back
            build.release.set()  # the device recovers: the two abandoned loads return, their engines are closed
            deadline = time.monotonic() + 20
            while len(build.engines) < 3 or any(e.session is not None for e in build.engines[1:]):
                assert time.monotonic() < deadline, "an abandoned engine was never closed"
                time.sleep(0.05)
            manager.build_limit_s = 60.0
            assert httpx.post(f"{url}/admin/reload", json={"version": 1}, timeout=60).status_code == 200
    finally:
        build.release.set()


@pytest.mark.parametrize("hung_read", ["versions", "load"])
def test_a_reload_whose_repository_read_hangs_answers_503_and_one_stuck_read_at_most(model_repository, launch,
                                                                                      hung_read):
    """A reload's reads of the repository (its version listing, the manifest, hashing the files) are bounded: a
    volume that stops answering gets 503 repository_unavailable past the bound, not a refusal of the version, and
    the reload lock is given back. While that read is still stuck, the next reload is answered 503 at once rather
    than leaving one more thread stuck behind it."""
    volume_back = threading.Event()
    with launch(model_repository, warmup_runs=0) as url:
        manager = url.app.state.service.models
        manager.reader.timeout_s = manager.build_limit_s = 1.0
        real_read = getattr(manager.repository, hung_read)
        # "load": the hashing read hangs (the manifest's own read, verify_files=False, answers).
        setattr(manager.repository, hung_read, lambda *args, **kw: (kw.get("verify_files") is False
                                                                    or volume_back.wait(60)) and real_read(*args, **kw))
        try:
            started = time.monotonic()
            refused = httpx.post(f"{url}/admin/reload", json={"version": 1}, timeout=30)
            assert refused.status_code == 503, refused.text
            assert refused.json()["error"]["code"] == "repository_unavailable"
            assert "the model repository did not answer within 1 s" in refused.json()["error"]["message"]
            assert 1.0 <= time.monotonic() - started < 10
            started = time.monotonic()
            again = httpx.post(f"{url}/admin/reload", json={"version": 1}, timeout=30)  # not 409: the lock is free
            assert again.status_code == 503, again.text
            assert "1 earlier read of the model repository has not returned" in again.json()["error"]["message"]
            # The message says no read was started (one would have waited its 1 s); the bound, a busy machine's, only
            # catches a wait on something else.
            assert time.monotonic() - started < 5
            assert httpx.get(f"{url}/readyz").status_code == 200  # still serving
        finally:
            volume_back.set()
        setattr(manager.repository, hung_read, real_read)
        deadline = time.monotonic() + 20
        while (answer := httpx.post(f"{url}/admin/reload", json={"version": 1}, timeout=60)).status_code == 503:
            assert time.monotonic() < deadline, answer.text  # the stuck read returns once the volume is back
            time.sleep(0.05)
        assert answer.status_code == 200, answer.text


@pytest.mark.parametrize(("error", "status", "code"), [
    (PermissionError(13, "Permission denied"), 422, "version_refused"),  # unreadable for good: refused
    (OSError(5, "Input/output error"), 503, "repository_unavailable"),  # a volume's error: retry later
])
def test_a_reload_whose_files_cannot_be_read_is_refused_or_retried_by_the_kind_of_error(model_repository, launch,
                                                                                         error, status, code):
    with launch(model_repository, warmup_runs=0) as url:
        manager = url.app.state.service.models
        real_load = manager.repository.load

        def load(*args, **kw):
            if kw.get("verify_files") is not False:  # hashing the files
                raise error
            return real_load(*args, **kw)

        manager.repository.load = load
        answer = httpx.post(f"{url}/admin/reload", json={"version": 1}, timeout=30)
        assert (answer.status_code, answer.json()["error"]["code"]) == (status, code), answer.text
        assert type(error).__name__ in answer.json()["error"]["message"] or status == 503
        # the watcher tries a refused version only once re-exported
        assert (1 in manager._refused.versions) == (status == 422)


def test_a_reload_the_volume_fails_is_counted_as_unavailable_not_as_a_refused_version(model_repository, launch):
    """convnext_model_reloads_total: a 503 repository_unavailable is result "unavailable" (the version is not refused:
    the volume is at fault), and a reload answered 404 (no such version) is no result at all."""
    with launch(model_repository, warmup_runs=0) as url:
        manager = url.app.state.service.models
        real_read = manager.reader.read

        async def stuck(*args, **kwargs):
            raise RepositoryStuck("1 earlier read of the model repository has not returned")

        manager.reader.read = stuck
        answer = httpx.post(f"{url}/admin/reload", json={}, timeout=30)
        assert (answer.status_code, answer.json()["error"]["code"]) == (503, "repository_unavailable"), answer.text
        manager.reader.read = real_read
        assert httpx.post(f"{url}/admin/reload", json={"version": 99}, timeout=30).status_code == 404
        assert metric(url, 'convnext_model_reloads_total{result="unavailable"}') == 1
        assert metric(url, "convnext_model_reloads_total") == 1  # neither refused nor the 404


def test_a_reload_whose_re_read_after_its_build_hangs_answers_503_not_a_refusal(model_repository, launch):
    """The build re-reads the version's manifest (an engine built on first start adds an artifact): a volume that
    stops answering there is the volume's fault too, so no refusal is recorded."""
    volume_back = threading.Event()
    with launch(model_repository, warmup_runs=0) as url:
        manager = url.app.state.service.models
        manager.reader.timeout_s = 1.0
        real_load = manager.repository.load

        def load(*args, **kw):
            if args[2:3] == (False,):  # _build's re-read: load(name, version, False)
                volume_back.wait(60)
            return real_load(*args, **kw)

        manager.repository.load = load
        try:
            answer = httpx.post(f"{url}/admin/reload", json={"version": 1}, timeout=30)
            assert answer.status_code == 503 and answer.json()["error"]["code"] == "repository_unavailable", answer.text
            assert 1 not in manager._refused.versions
            assert httpx.get(f"{url}/readyz").status_code == 200  # the version it had still serves
        finally:
            volume_back.set()


def test_a_rebuild_is_given_engine_timeout_ms_per_engine_call_and_with_tensorrt_the_time_to_build():
    cpu = build_timeout_s(Settings(engine_timeout_ms=10_000, warmup_runs=2))
    assert cpu == OPEN_BOUND_S + 5 * 10  # warm-up at two batch sizes twice each, and the smoke run
    assert build_timeout_s(Settings(engine_timeout_ms=20_000, warmup_runs=2)) == cpu + 5 * 10
    assert build_timeout_s(Settings(engine_timeout_ms=10_000, warmup_runs=2, provider="cuda")) == cpu
    for options in ({"engine": "tensorrt"}, {"provider": "tensorrt"}):  # either may build a TensorRT engine
        assert build_timeout_s(Settings(engine_timeout_ms=10_000, warmup_runs=2, **options)) == \
            cpu + BUILD_LOCK_TIMEOUT_S
