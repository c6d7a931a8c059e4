"""What the service serves as versions are exported: a version exported anew (`export --overwrite`) while its engine was
being built has its engine built again from the new export (a few times at most); the repository watcher reloads a
pinned version (`version` set) when it is exported again, never leaving it for a newer one."""
from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

import httpx
import pytest

from runtime.engines.onnxruntime import OnnxRuntimeEngine
from runtime.repository import ModelRepository, now_utc
from service.app import default_engine
from tests.service.test_engine_health import GatedFactory, PoisonedEngine, black_png
from tests.service.test_hot_swap import NAME, publish_copy_of, wait_for


def wait_for_a_later_second(created_at: datetime) -> None:
    """Until an export now gets a later created_at: manifests tell exports apart by it (to the microsecond; a clock
    that steps back would give an earlier one)."""
    while now_utc() <= created_at:
        time.sleep(0.05)


class OverwrittenWhileWarming(OnnxRuntimeEngine):
    """The real engine; while it warms up (its ONNX file read already), `overwrite` runs."""

    overwrite: Callable[[], None]

    def warmup(self, runs: int) -> None:
        super().warmup(runs)
        self.overwrite()


def overwritten_during_first_build(root: Path, before_opening: bool, built: list):
    """The real engine factory, recording (manifest, engine) for each build; during the first, an operator exports
    version 2 again over itself with version 1's weights: before the engine opens its ONNX file (it then runs the new
    export's weights), or once it has (while it warms up: it runs the first export's)."""
    def overwrite() -> None:
        wait_for_a_later_second(built[0][0].created_at)
        publish_copy_of(root, 1, over=2)

    def build(version, settings):
        first = not built
        built.append((version.manifest, None))
        if first and before_opening:
            overwrite()
        engine = default_engine(version, settings)
        if first and not before_opening:
            engine.__class__ = OverwrittenWhileWarming
            engine.overwrite = overwrite
        built[-1] = (version.manifest, engine)
        return engine

    return build


def reloads(url: str) -> float:
    lines = [line for line in httpx.get(f"{url}/metrics").text.splitlines()
             if line.startswith('convnext_model_reloads_total{result="ok"}')]
    return float(lines[0].split()[-1]) if lines else 0.0


@pytest.mark.parametrize("before_opening", [True, False], ids=["before-the-engine-opens-its-file", "during-warm-up"])
def test_a_version_exported_anew_while_its_engine_was_built_is_built_again_from_the_new_export(
        own_repository, real_photos, launch, before_opening):
    """Whether the engine read its file before or after the new export, it is closed and one is built from the new
    export: the manifest served is always the one its engine was built from (kept beside the first engine, it was the
    old one while the engine could run the new weights)."""
    built: list = []
    with launch(own_repository, overwritten_during_first_build(own_repository, before_opening, built)) as url:
        models = url.app.state.service.models
        exported_anew = ModelRepository(own_repository).load(NAME, 2).manifest
        assert [manifest.created_at == exported_anew.created_at for manifest, _ in built] == [False, True]
        assert models.current.model.manifest == exported_anew and models.current.engine is built[1][1]
        assert built[0][1].session is None  # the first engine was closed
        response = httpx.post(f"{url}/classify", content=real_photos[0].read_bytes(),
                              headers={"content-type": "image/jpeg"}, timeout=60)
        assert response.status_code == 200 and response.json()["model"]["version"] == 2


def test_a_version_exported_anew_during_every_build_is_refused_after_three_builds(own_repository, launch):
    """A reload whose every build is overtaken by another export of the version ends (422) instead of building on."""
    built: list = []

    def build(version, settings):
        built.append(version.manifest)
        if version.manifest.version == 1:  # the reload's builds, not the start's (the latest: 2)
            wait_for_a_later_second(version.manifest.created_at)
            publish_copy_of(own_repository, 1, over=1)
        return default_engine(version, settings)

    with launch(own_repository, build) as url:
        refused = httpx.post(f"{url}/admin/reload", json={"version": 1}, timeout=60)
        assert refused.status_code == 422, refused.text
        assert "atto/1 was exported anew during each of 3 engine builds in a row" in refused.json()["error"]["message"]
        assert [manifest.version for manifest in built] == [2, 1, 1, 1]
        assert url.app.state.service.models.current.version == 2  # still serving what it served


def test_a_pinned_version_is_reloaded_when_exported_again_and_never_left_for_a_newer_one(own_repository, real_photos,
                                                                                         launch):
    with launch(own_repository, version=1, watch_interval_s=0.1) as url:
        models = url.app.state.service.models
        assert publish_copy_of(own_repository, 2) == 3  # newer versions than the pinned one: 2, and now 3
        first_export = models.current.model.manifest.created_at
        wait_for_a_later_second(first_export)
        publish_copy_of(own_repository, 2, over=1)  # version 1 exported again, with version 2's weights
        wait_for(lambda: reloads(url) == 1, "the watcher to reload version 1 exported again")
        assert models.current.version == 1 and models.current.model.manifest.created_at > first_export
        response = httpx.post(f"{url}/classify", content=real_photos[0].read_bytes(),
                              headers={"content-type": "image/jpeg"}, timeout=60)
        assert response.status_code == 200 and response.json()["model"]["version"] == 1


def test_a_rebuild_of_a_broken_engine_is_held_to_the_served_versions_classes(own_repository, real_photos, launch):
    """The served version exported again with other classes while its engine is broken: the rebuild re-reads the
    version, and like a reload refuses a version whose classes differ (queued answers would switch classes
    mid-service), building no engine for it; the service stays not ready and says why until a restart."""
    build = GatedFactory(PoisonedEngine)
    try:
        with launch(own_repository, build, engine_max_consecutive_failures=1, warmup_runs=0) as url:
            served = ModelRepository(own_repository).load(NAME, 2)
            with ModelRepository(own_repository).new_version(NAME, 2, overwrite=True) as staged:
                for artifact in served.manifest.artifacts:
                    shutil.copy(served.artifact_path(artifact), staged.path / artifact.file)
                labels = tuple(f"other {label}" for label in served.manifest.labels)
                staged.manifest = served.manifest.model_copy(update={"labels": labels, "created_at": now_utc()})
            assert httpx.post(f"{url}/classify", content=black_png(), timeout=60,
                              headers={"content-type": "image/png"}).status_code == 500  # the engine breaks
            build.rebuild.set()
            wait_for(lambda: "rebuilding the engine failed" in httpx.get(f"{url}/readyz").json().get("reason", ""),
                     "the rebuild to be refused")
            assert build.builds == 1  # no engine was built for the export with other classes
            assert httpx.get(f"{url}/readyz").status_code == 503
    finally:
        build.open()
