"""What the repository watcher serves as versions are exported: a version exported anew (`export --overwrite`) while
its engine was being built is served with the manifest that engine was built from, then reloaded; a pinned version
(`version` set) is reloaded when exported again, never left for a newer one."""
from __future__ import annotations

import time
from datetime import datetime
from pathlib import Path

import httpx

from runtime.engines.onnxruntime import OnnxRuntimeEngine
from runtime.repository import ModelRepository, now_utc
from service.app import default_engine
from tests.service.test_hot_swap import NAME, publish_copy_of, wait_for


def wait_for_a_later_second(created_at: datetime) -> None:
    """Until an export now gets a later created_at: manifests tell exports apart by it, to the second (a real export
    takes longer than that)."""
    while now_utc() <= created_at:
        time.sleep(0.05)


def overwritten_during_first_warmup(root: Path, built_from: list):
    """The real engine, recording the manifest each is built from; while the first one warms up (its ONNX file read
    already), an operator exports version 2 again over itself, with version 1's weights."""
    class OverwrittenWhileWarming(OnnxRuntimeEngine):
        def warmup(self, runs: int) -> None:
            super().warmup(runs)
            wait_for_a_later_second(built_from[0].created_at)
            publish_copy_of(root, 1, over=2)

    def build(version, settings):
        built_from.append(version.manifest)
        engine = default_engine(version, settings)
        if len(built_from) == 1:
            engine.__class__ = OverwrittenWhileWarming
        return engine

    return build


def reloads(url: str) -> float:
    lines = [line for line in httpx.get(f"{url}/metrics").text.splitlines()
             if line.startswith('convnext_model_reloads_total{result="ok"}')]
    return float(lines[0].split()[-1]) if lines else 0.0


def test_a_version_exported_anew_while_its_engine_was_built_keeps_that_engines_manifest_until_reloaded(
        own_repository, real_photos, launch):
    """The engine was built from the first export: served beside the new manifest, its outputs would be given the new
    export's classes (a 500 for every request, with another class count), and the watcher would see nothing new."""
    built_from: list = []
    with launch(own_repository, overwritten_during_first_warmup(own_repository, built_from),
                watch_interval_s=0.1) as url:
        models = url.app.state.service.models
        wait_for(lambda: reloads(url) == 1, "the watcher to reload the version exported anew")
        exported_anew = ModelRepository(own_repository).load(NAME, 2).manifest
        assert len(built_from) == 2 and built_from[0].created_at != exported_anew.created_at
        assert built_from[1].created_at == exported_anew.created_at  # the reload built from the new export
        assert models.current.model.manifest == exported_anew
        response = httpx.post(f"{url}/classify", content=real_photos[0].read_bytes(),
                              headers={"content-type": "image/jpeg"}, timeout=60)
        assert response.status_code == 200 and response.json()["model"]["version"] == 2


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
