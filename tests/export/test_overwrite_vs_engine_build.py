"""An export --overwrite of a version that a TensorRT engine is being built for: the overwrite waits for the build
(the version's lock), a build that waited meanwhile builds for the version now in place, and an engine is never added
to a version other than the one it was built from.

The build is the stand-in of tests/export/engine_build_worker.py; the lock, the swap and add_artifact are the real
runtime code. An overwrite that would have to wait is given no time to (lock_timeout_s=0), so it fails at once instead
of waiting for the build that runs on its own thread.
"""
from __future__ import annotations

import errno
import os
import threading
import time
from pathlib import Path

import pytest

import runtime.repository as repository_module
from runtime.repository import LOCK_FILE, ModelRepository, RepositoryError
from runtime.repository_writes import lock_now
from runtime.tensorrt import find_or_build_engine
from tests.export.engine_build_worker import NAME, PROFILE, TARGET, StandInBuild, make_version
from tests.export.repository_write_worker import fill

WAIT_S = 60  # how long a thread waits for the other side (never reached when the code works)


def overwrite_at_once(root: Path, content: str) -> None:
    """What `python -m export onnx --version 1 --overwrite` does, taking the version's lock only if it is free."""
    with ModelRepository(root).new_version(NAME, 1, overwrite=True, lock_timeout_s=0) as staged:
        fill(staged, content)


def engines_of(version) -> list:
    return [a for a in version.manifest.artifacts if a.format == "tensorrt"]


def hidden(root: Path) -> list[str]:
    return sorted(p.name for p in (root / NAME).iterdir() if p.name.startswith("."))


@pytest.mark.parametrize("moment", ["mid-build", "between-engine-copy-and-manifest-write"])
def test_an_overwrite_never_swaps_a_version_while_an_engine_is_built_for_it(tmp_path, monkeypatch, caplog, moment):
    root = tmp_path / "models"
    version = make_version(root)
    refused: list[RepositoryError] = []

    def try_to_overwrite():
        with pytest.raises(RepositoryError, match="still holds it") as error:
            overwrite_at_once(root, "the new weights")
        refused.append(error.value)

    class OverwriteMidBuild(StandInBuild):
        def __call__(self, *args):
            parity = super().__call__(*args)
            try_to_overwrite()
            return parity

    build: StandInBuild
    if moment == "mid-build":
        build = OverwriteMidBuild(tmp_path / "builds.log")
    else:
        build = StandInBuild(tmp_path / "builds.log")
        real_write = repository_module._write_json_atomic

        def write_after_an_overwrite(path, data):  # add_artifact: the engine file is in, its manifest entry not yet
            if Path(path).parent == version.path:  # not the overwrite's own manifest, in its staging folder
                try_to_overwrite()
            real_write(path, data)

        monkeypatch.setattr(repository_module, "_write_json_atomic", write_after_an_overwrite)

    artifact, current = find_or_build_engine(version, "fp16", PROFILE, TARGET, build, repository_root=root)
    monkeypatch.undo()
    assert len(refused) == 1  # the build held the version's lock: the overwrite could not swap the folder
    assert "tiny/1 is locked (an engine being built for it?): the overwrite waits for it" in caplog.text
    loaded = ModelRepository(root).load(NAME, 1, verify_files=True)  # every file matches its manifest
    assert loaded.manifest == current.manifest and engines_of(loaded) == [artifact]
    assert (loaded.path / "model.onnx").read_bytes() == b"placeholder onnx"
    assert hidden(root) == []  # the refused overwrite left no staging folder

    overwrite_at_once(root, "the new weights")  # the build is over: the overwrite goes through
    replaced = ModelRepository(root).load(NAME, 1, verify_files=True)
    assert (replaced.path / "model.onnx").read_text() == "the new weights" and engines_of(replaced) == []
    assert hidden(root) == []


def wait_until_opened_twice(path: Path) -> None:
    """Until two of this process's descriptors are open on `path` (/proc/self/fd)."""
    deadline = time.monotonic() + WAIT_S
    while sum(os.path.realpath(f"/proc/self/fd/{fd}") == str(path) for fd in os.listdir("/proc/self/fd")) < 2:
        assert time.monotonic() < deadline, f"{path} was never opened by the waiting thread"
        time.sleep(0.01)


def test_a_build_that_waited_while_an_overwrite_swapped_the_version_locks_the_new_one(tmp_path):
    """The waiter's flock was on the replaced folder's lock file: it must not build under a lock that guards nothing."""
    root = tmp_path / "models"
    make_version(root)
    repository = ModelRepository(root)
    holding, release = threading.Event(), threading.Event()
    errors: list[BaseException] = []

    def waiting_builder():
        try:
            with repository.lock(NAME, 1, timeout_s=WAIT_S):
                holding.set()
                release.wait(WAIT_S)
        except BaseException as error:  # noqa: BLE001 - handed to the test's thread
            errors.append(error)
            holding.set()

    folder = root / NAME / "1"
    with repository.lock(NAME, 1, timeout_s=WAIT_S):  # the overwrite, swapping the folders under the lock
        waiter = threading.Thread(target=waiting_builder)
        waiter.start()
        wait_until_opened_twice(folder / LOCK_FILE)  # the waiter has the old lock file open and waits for its flock
        folder.rename(root / NAME / ".old-1-test")
        folder.mkdir()
    try:
        assert holding.wait(WAIT_S) and errors == []
        fd = os.open(folder / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            assert not lock_now(fd)  # the new folder's lock file: the waiter holds its lock now
        finally:
            os.close(fd)
    finally:
        release.set()
        waiter.join(WAIT_S)


def test_add_artifact_refuses_a_version_replaced_since_the_file_was_made_from_it(tmp_path):
    """An overwrite that took no lock (an older release's export) replaced the version during the build."""
    root = tmp_path / "models"
    built_from = make_version(root).manifest
    overwrite_at_once(root, "the new weights")
    engine = tmp_path / "engine"
    engine.write_bytes(b"engine built from the old weights")
    artifact = repository_module.describe_file(tmp_path, "engine", format="tensorrt", precision="fp16")
    artifact = artifact.model_copy(update={"file": "engines/model.fp16.engine"})
    with pytest.raises(RepositoryError, match="was replaced while engines/model.fp16.engine was made from it"):
        ModelRepository(root).add_artifact(NAME, 1, engine, artifact, based_on=built_from)
    current = ModelRepository(root).load(NAME, 1, verify_files=True)
    assert engines_of(current) == [] and not (current.path / "engines").exists()


def test_an_overwrite_locks_a_version_whose_lock_file_another_user_made(tmp_path, monkeypatch):
    """The service (another user) built an engine for the version and left its .lock (0644, not writable here): the
    overwrite opens it read-only, enough for flock, as it could replace the version before it took the lock."""
    root = tmp_path / "models"
    make_version(root)
    theirs = root / NAME / "1" / LOCK_FILE
    theirs.touch(mode=0o644)
    real_open = os.open

    def as_another_users_file(path, flags, *args, **kwargs):  # root may write any file: refuse as for others
        if Path(path) == theirs and flags & (os.O_WRONLY | os.O_RDWR):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", as_another_users_file)
    overwrite_at_once(root, "the new weights")
    monkeypatch.undo()
    assert (ModelRepository(root).load(NAME, 1).path / "model.onnx").read_text() == "the new weights"
    assert hidden(root) == []
