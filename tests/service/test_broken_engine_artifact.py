"""A TensorRT engine in the manifest that is missing or no longer matches its sha256 stops no start: the service
verifies the ONNX files it reads and leaves engines to find-or-build, which rebuilds the one it would serve.

ONNX Runtime and OpenVINO replicas start and serve over HTTP (and reload) with the broken engine beside them; the
tensorrt engine's decision is the real find-or-build on the version as the service loads it, with a stand-in build
(TensorRT itself needs a GPU: tests/gpu)."""
from __future__ import annotations

import shutil
from pathlib import Path

import httpx
import pytest

from runtime.repository import ModelRepository, RepositoryError
from runtime.tensorrt import BatchProfile, find_or_build_engine
from service.app import check_servable
from service.repository_reader import load_model_version
from service.settings import Settings
from tests.export.engine_build_worker import TARGET, StandInBuild
from tests.service.conftest import classify_top1

NAME = "atto"
PROFILE = BatchProfile(1, 8, 8)  # what --max-batch-size 8 builds
DAMAGES = ("corrupt", "missing")


def damage(path: Path, how: str) -> None:
    if how == "missing":
        path.unlink()
    else:
        path.write_bytes(path.read_bytes()[:-1])  # a truncated copy


@pytest.fixture(params=DAMAGES)
def broken_engine(request, model_repository, tmp_path) -> tuple[Path, Path, StandInBuild]:
    """A copy of the session repository whose version lists an fp16 engine for TARGET (an H100) that is damaged:
    (repository root, the engine's path, the stand-in build that made it)."""
    root = tmp_path / "models"
    shutil.copytree(model_repository / NAME / "1", root / NAME / "1", ignore=shutil.ignore_patterns(".lock"))
    build = StandInBuild(tmp_path / "builds.log")
    engine, version = find_or_build_engine(ModelRepository(root).load(NAME, 1), "fp16", PROFILE, TARGET, build)
    damage(version.artifact_path(engine), request.param)
    return root, version.artifact_path(engine), build


def test_the_full_check_still_refuses_the_version(broken_engine):
    """`export list`-style full verification is unchanged: the damaged engine is named."""
    root, engine_path, _ = broken_engine
    with pytest.raises(RepositoryError, match=engine_path.name):
        ModelRepository(root).load(NAME, 1)


@pytest.mark.parametrize("engine", ["onnxruntime", "openvino"])
def test_cpu_engines_pass_the_pre_start_check(broken_engine, engine):
    root, _, _ = broken_engine
    assert check_servable(Settings(repository=str(root), engine=engine)).manifest.version == 1


def test_an_onnx_runtime_replica_starts_serves_and_reloads_beside_it(broken_engine, launch, real_photos):
    root, _, _ = broken_engine
    with launch(root) as url:
        classify_top1(url, real_photos[0])
        reload = httpx.post(f"{url}/admin/reload", json={"version": 1}, timeout=60)
        assert reload.status_code == 200, reload.text


def test_the_tensorrt_engine_is_rebuilt_in_place_from_the_version_the_service_loads(broken_engine):
    root, engine_path, build = broken_engine
    version = load_model_version(ModelRepository(root), NAME, 1)  # the service's load: no RepositoryError
    rebuilt, current = find_or_build_engine(version, "fp16", PROFILE, TARGET, build)
    assert current.artifact_path(rebuilt) == engine_path and len(build.builds()) == 2  # made, then rebuilt
    assert ModelRepository(root).load(NAME, 1).manifest == current.manifest  # every file matches its sha256 again


def test_a_broken_onnx_file_still_stops_the_start(broken_engine):
    """Only engines are left out: an ONNX file the engines read is verified as before."""
    root, _, _ = broken_engine
    damage(root / NAME / "1" / "model.onnx", "corrupt")
    with pytest.raises(RepositoryError, match="model.onnx does not match its sha256"):
        check_servable(Settings(repository=str(root)))
