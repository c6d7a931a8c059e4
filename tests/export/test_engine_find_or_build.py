"""Find-or-build without a GPU: one build across processes, stale versions, rebuild of an engine that will not load,
one engine per GPU device model, and engines named before device models were in file names.

The build and the deserializer are stand-ins (tests/export/engine_build_worker.py and `open_engine` below);
the lock, the re-checks, the manifest updates and the rebuild decision are the real runtime.tensorrt code.
"""
from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from runtime.repository import Artifact, ModelRepository, RepositoryError, TensorRTInfo, describe_file
from runtime.tensorrt import BatchProfile, EngineDeserializeError, find_or_build_engine, open_or_rebuild
from tests.export.engine_build_worker import NAME, PROFILE, TARGET, StandInBuild, make_version

REPO_ROOT = Path(__file__).resolve().parents[2]
H200 = dataclasses.replace(TARGET, device_name="NVIDIA H200")  # TARGET is an H100: both are compute capability 9.0


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
                          "2", "1.0"], cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True)
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


def test_the_next_build_removes_the_staging_folder_of_a_replica_killed_mid_build(tmp_path):
    root, log, ready = tmp_path / "models", tmp_path / "builds.log", tmp_path / "ready"
    version = make_version(root)
    ready.mkdir()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])}
    # A build of 60 s: the kill lands mid-build however long the machine takes to get to it.
    replica = subprocess.Popen([sys.executable, "-m", "tests.export.engine_build_worker", str(root), str(log),
                                str(ready), "1", "60"], cwd=REPO_ROOT, env=env, stdout=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while not list(version.path.glob(".engine-*/*")):  # the stand-in build logs, writes its engine, then sleeps
            assert replica.poll() is None and time.monotonic() < deadline
            time.sleep(0.01)
    finally:  # killed mid-build, as the test wants, or because the wait failed: never left building
        replica.send_signal(signal.SIGKILL)
    assert replica.wait(timeout=30) == -signal.SIGKILL
    assert list(version.path.glob(".engine-*"))  # the killed build's staging folder, with its engine file in it

    artifact, current = find_or_build_engine(version, "fp16", PROFILE, TARGET, StandInBuild(log))
    assert not list(current.path.glob(".engine-*"))
    assert engines_of(current) == [artifact]


def test_each_device_model_of_one_architecture_builds_and_then_finds_its_own_engine(tmp_path):
    """An H100 and an H200 (both sm90) sharing a repository: one engine each, side by side, each found again."""
    version = make_version(tmp_path)
    build = StandInBuild(tmp_path / "builds.log")
    for_h100, _ = find_or_build_engine(version, "fp16", PROFILE, TARGET, build)
    for_h200, current = find_or_build_engine(version, "fp16", PROFILE, H200, build)
    assert len(build.builds()) == 2 and for_h200.file != for_h100.file
    assert ".sm90-h200." in for_h200.file and for_h200.tensorrt.device_name == "NVIDIA H200"
    assert engines_of(current) == [for_h100, for_h200]
    assert find_or_build_engine(version, "fp16", PROFILE, TARGET, build)[0] == for_h100
    assert find_or_build_engine(version, "fp16", PROFILE, H200, build)[0] == for_h200
    assert len(build.builds()) == 2


LEGACY_FILE = "engines/model.fp16.trt10.13.2.6.sm90.b1-4-8.engine"  # named before device models were in names


def add_legacy_engine(version, device_name: str) -> Artifact:
    """An engine under LEGACY_FILE, built on `device_name` for PROFILE, added to `version` as an older export did."""
    info = TensorRTInfo(tensorrt_version=TARGET.tensorrt_version, compute_capability=TARGET.compute_capability,
                        device_name=device_name, min_batch=PROFILE.min_batch, opt_batch=PROFILE.opt_batch,
                        max_batch=PROFILE.max_batch)
    with tempfile.TemporaryDirectory() as tmp:
        staged = Path(tmp) / "legacy.engine"
        staged.write_bytes(b"engine built before device models were in names")
        legacy = describe_file(Path(tmp), staged.name, format="tensorrt", precision="fp16", tensorrt=info)
        legacy = legacy.model_copy(update={"file": LEGACY_FILE})
        ModelRepository(version.path.parent.parent).add_artifact(NAME, 1, staged, legacy)
    return legacy


def test_an_engine_named_before_device_models_loads_on_its_own_device_model_only(tmp_path):
    version = make_version(tmp_path)
    legacy = add_legacy_engine(version, TARGET.device_name)
    build = StandInBuild(tmp_path / "builds.log")
    found, _ = find_or_build_engine(version, "fp16", PROFILE, TARGET, build)
    assert found == legacy and build.builds() == []  # the same device model: used as it is, no rebuild
    for_h200, current = find_or_build_engine(version, "fp16", PROFILE, H200, build)
    assert len(build.builds()) == 1 and ".sm90-h200." in for_h200.file  # another model of sm90: its own engine
    assert engines_of(current) == [legacy, for_h200]  # beside the old one, which its own device model still uses


def test_an_engine_named_before_device_models_is_rebuilt_in_place(tmp_path):
    version = make_version(tmp_path)
    legacy = add_legacy_engine(version, TARGET.device_name)
    build = StandInBuild(tmp_path / "builds.log")
    rebuilt, current = find_or_build_engine(version, "fp16", PROFILE, TARGET, build, replace=legacy)  # won't load
    assert rebuilt.file == LEGACY_FILE and rebuilt.sha256 != legacy.sha256 and len(build.builds()) == 1
    assert engines_of(current) == [rebuilt]  # replaced, not left beside the new one to be found (and fail) again
    again, _ = find_or_build_engine(version, "fp16", PROFILE, TARGET, build, rebuild=True)  # --rebuild
    assert again.file == LEGACY_FILE and len(build.builds()) == 2
    assert engines_of(ModelRepository(tmp_path).load(NAME, 1, verify_files=True)) == [again]
