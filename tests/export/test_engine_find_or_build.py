"""Find-or-build without a GPU: one build across processes, stale versions, rebuild of an engine that will not load.

The build and the deserializer are stand-ins (tests/export/engine_build_worker.py and `open_engine` below);
the lock, the re-checks, the manifest updates and the rebuild decision are the real runtime.tensorrt code.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from runtime.repository import ModelRepository, RepositoryError
from runtime.tensorrt import BatchProfile, EngineDeserializeError, find_or_build_engine, open_or_rebuild
from tests.export.engine_build_worker import NAME, PROFILE, TARGET, StandInBuild, make_version

REPO_ROOT = Path(__file__).resolve().parents[2]


def engines_of(version):
    return [a for a in version.manifest.artifacts if a.format == "tensorrt"]


def open_engine(version, artifact) -> bytes:
    """Stand-in for TensorRT's deserializer: an engine file that does not start with b'engine' will not load."""
    data = version.artifact_path(artifact).read_bytes()
    if not data.startswith(b"engine"):
        raise EngineDeserializeError(f"TensorRT could not deserialize {artifact.file}")
    return data


def test_two_replicas_build_one_engine_and_leave_a_consistent_manifest(tmp_path):
    root, log, ready = tmp_path / "models", tmp_path / "builds.log", tmp_path / "ready"
    make_version(root)
    ready.mkdir()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])}
    replicas = [
        subprocess.Popen([sys.executable, "-m", "tests.export.engine_build_worker", str(root), str(log), str(ready),
                          "2"], cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    outputs = [replica.communicate(timeout=120) for replica in replicas]
    assert [r.returncode for r in replicas] == [0, 0], [err for _, err in outputs]
    assert len(log.read_text().splitlines()) == 1  # exactly one build; the other replica found its engine
    results = [json.loads(out) for out, _ in outputs]
    assert results[0] == results[1]
    loaded = ModelRepository(root).load(NAME, 1, verify_files=True)  # every artifact matches its sha256
    assert [a.sha256 for a in engines_of(loaded)] == [results[0]["sha256"]]
    assert not list(loaded.path.glob(".engine-*"))  # no staging folder left behind


def test_a_stale_version_finds_the_engine_another_call_added(tmp_path):
    stale = make_version(tmp_path)
    build = StandInBuild(tmp_path / "builds.log")
    first, updated = find_or_build_engine(stale, "fp16", PROFILE, TARGET, build)
    again, current = find_or_build_engine(stale, "fp16", PROFILE, TARGET, build)  # stale: has no engine in it
    assert again == first and len(build.builds()) == 1
    assert current.manifest == updated.manifest and engines_of(current) == [first]


def test_an_engine_that_fails_to_deserialize_is_rebuilt_once_in_place(tmp_path):
    version = make_version(tmp_path)
    build = StandInBuild(tmp_path / "builds.log", contents=(b"corrupt", b"engine"))
    broken, _ = find_or_build_engine(version, "fp16", BatchProfile(1, 8, 16), TARGET, build)  # covers PROFILE
    opened, artifact, current = open_or_rebuild(
        lambda replace: find_or_build_engine(version, "fp16", PROFILE, TARGET, build, replace=replace), open_engine)
    assert opened.startswith(b"engine") and len(build.builds()) == 2  # the first build, then one rebuild
    # Rebuilt with its own profile under its own file name, so the broken entry is replaced, not left beside it.
    assert artifact.file == broken.file and artifact.sha256 != broken.sha256
    assert engines_of(current) == [artifact]
    assert ModelRepository(tmp_path).load(NAME, 1, verify_files=True).manifest == current.manifest


def test_an_engine_that_still_fails_after_the_rebuild_raises_instead_of_looping(tmp_path):
    version = make_version(tmp_path)
    build = StandInBuild(tmp_path / "builds.log", contents=(b"corrupt",))
    with pytest.raises(EngineDeserializeError, match="could not deserialize"):
        open_or_rebuild(
            lambda replace: find_or_build_engine(version, "fp16", PROFILE, TARGET, build, replace=replace),
            open_engine)
    assert len(build.builds()) == 2


def test_an_engine_another_replica_already_replaced_is_not_rebuilt_again(tmp_path):
    version = make_version(tmp_path)
    build = StandInBuild(tmp_path / "builds.log", contents=(b"corrupt", b"engine"))
    broken, _ = find_or_build_engine(version, "fp16", PROFILE, TARGET, build)
    fixed, _ = find_or_build_engine(version, "fp16", PROFILE, TARGET, build, replace=broken)  # replica A
    again, _ = find_or_build_engine(version, "fp16", PROFILE, TARGET, build, replace=broken)  # replica B, later
    assert again == fixed != broken and len(build.builds()) == 2


def test_an_engine_file_that_does_not_match_its_sha256_is_rebuilt(tmp_path):
    version = make_version(tmp_path)
    build = StandInBuild(tmp_path / "builds.log")
    artifact, current = find_or_build_engine(version, "fp16", PROFILE, TARGET, build)
    current.artifact_path(artifact).write_bytes(b"truncated")
    rebuilt, current = find_or_build_engine(version, "fp16", PROFILE, TARGET, build)
    assert rebuilt.file == artifact.file and len(build.builds()) == 2
    ModelRepository(tmp_path).load(NAME, 1, verify_files=True)


def test_a_held_lock_times_out_with_a_clear_message(tmp_path):
    version = make_version(tmp_path)
    build = StandInBuild(tmp_path / "builds.log")
    with ModelRepository(tmp_path).lock(NAME, 1, timeout_s=1):  # another replica building
        with pytest.raises(RepositoryError, match="another process .* still holds it"):
            find_or_build_engine(version, "fp16", PROFILE, TARGET, build, lock_timeout_s=0.2)
    assert build.builds() == []
    find_or_build_engine(version, "fp16", PROFILE, TARGET, build, lock_timeout_s=0.2)  # released: builds
    assert len(build.builds()) == 1
