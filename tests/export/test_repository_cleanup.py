"""What dead writes leave in a model's folder is removed by the next write; a live write's folders never are.

The writers are real processes (tests/export/repository_write_worker.py), killed with a real SIGKILL. What a volume
refuses (a failed rename, no file locks, another user's file) is stood in for by patching the one call that fails.
"""
from __future__ import annotations

import errno
import fcntl
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import runtime.repository_writes as repository_writes
from runtime.repository import ModelRepository, RepositoryError
from runtime.repository_writes import LEGACY_WRITE_MAX_AGE_S
from tests.export.repository_write_worker import NAME, write_version

REPO_ROOT = Path(__file__).resolve().parents[2]
START_TIMEOUT_S = 60


def start_writer(*args: object) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])}
    return subprocess.Popen([sys.executable, "-m", "tests.export.repository_write_worker", *map(str, args)],
                            cwd=REPO_ROOT, env=env, stderr=subprocess.PIPE, text=True)


def wait_until_staged(writer: subprocess.Popen, ready: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while not ready.exists():
        assert writer.poll() is None, writer.communicate()[1]
        assert time.monotonic() < deadline, "the writer never staged its version"
        time.sleep(0.02)


def hidden(root: Path) -> list[str]:
    return sorted(p.name for p in (root / NAME).iterdir() if p.name.startswith("."))


def test_the_next_write_removes_what_a_killed_export_left(tmp_path):
    root, ready = tmp_path / "models", tmp_path / "ready"
    writer = start_writer(root, 1, "hold", ready, tmp_path / "never")
    try:
        wait_until_staged(writer, ready)
    finally:  # killed once staged, as the test wants, or because the wait failed: never left holding
        writer.send_signal(signal.SIGKILL)
    left = hidden(root)
    assert [n for n in left if n.startswith(".staging-1-") and not n.endswith(".lock")], left
    assert writer.wait(timeout=30) == -signal.SIGKILL
    assert hidden(root) == left  # the dead export's folder and lock stay until the next write

    write_version(root, 2, "next")
    assert hidden(root) == []
    assert ModelRepository(root).versions(NAME) == [2]


def test_a_live_export_keeps_its_staging_folder_while_another_write_publishes(tmp_path):
    root, ready, go = tmp_path / "models", tmp_path / "ready", tmp_path / "go"
    writer = start_writer(root, 1, "hold", ready, go)
    try:
        wait_until_staged(writer, ready)
        live = hidden(root)
        write_version(root, 2, "meanwhile")
        assert hidden(root) == live  # untouched: its writer holds the lock
        go.touch()
        assert writer.wait(timeout=60) == 0, writer.communicate()[1]
    finally:
        writer.kill()
    repository = ModelRepository(root)
    assert repository.versions(NAME) == [1, 2]
    assert (repository.load(NAME, 1).path / "model.onnx").read_text().startswith("held by ")
    assert hidden(root) == []


def test_an_overwrite_killed_between_its_two_renames_gets_the_old_version_back(tmp_path):
    root = tmp_path / "models"
    write_version(root, 1, "the original")
    writer = start_writer(root, 1, "die-mid-overwrite")
    assert writer.wait(timeout=60) == -signal.SIGKILL, writer.communicate()[1]
    assert not (root / NAME / "1").exists()  # moved aside, the new one not in place: the version is gone
    assert {n.split("-")[0] for n in hidden(root)} == {".old", ".staging"}

    write_version(root, 2, "next")
    repository = ModelRepository(root)
    assert repository.versions(NAME) == [1, 2]
    assert (repository.load(NAME, 1).path / "model.onnx").read_text() == "the original"
    assert hidden(root) == []


def _leftover(folder: Path, age_s: float) -> Path:
    folder.mkdir(parents=True)
    (folder / "model.onnx").write_text("half an export")
    then = time.time() - age_s
    for path in (folder / "model.onnx", folder):
        os.utime(path, (then, then))
    return folder


def test_lockless_folders_of_earlier_exports_are_removed_only_once_a_day_old(tmp_path, caplog):
    root = tmp_path / "models"
    day = LEGACY_WRITE_MAX_AGE_S
    write_version(root, 1, "the version an overwrite replaced")
    stale_staging = _leftover(root / NAME / ".staging-3-k2j4h5ab", day + 3600)  # mkdtemp's names, no lock file
    stale_trash = _leftover(root / NAME / ".old-1-4242", day + 3600)  # the pid-named trash of an overwrite
    recent = _leftover(root / NAME / ".staging-4-q9w8e7rt", day - 3600)  # may be a live export of older code
    orphan = _leftover(root / NAME / ".old-2-4243", day + 3600)  # version 2 is missing: maybe its only copy
    with caplog.at_level("WARNING", logger="runtime.repository"):
        write_version(root, 5, "next")
    assert not stale_staging.exists() and not stale_trash.exists()
    assert recent.exists() and orphan.exists()
    assert ".old-2-4243 holds 2, which an overwrite that died moved aside" in caplog.text


def test_a_dead_writes_lock_file_alone_is_removed_and_a_held_one_kept(tmp_path):
    root = tmp_path / "models"
    (root / NAME).mkdir(parents=True)
    dead = root / NAME / ".staging-6-0123456789abcdef.lock"  # died before making its folder
    dead.touch()
    held = root / NAME / ".staging-7-fedcba9876543210.lock"  # about to make its folder
    with open(held, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another open file description: conflicts as another process would
        write_version(root, 1, "next")
        assert not dead.exists() and held.exists()


def open_descriptors() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.parametrize("failure", [OSError(errno.EIO, os.strerror(errno.EIO)), KeyboardInterrupt()],
                         ids=["EIO", "Ctrl-C"])
def test_an_overwrite_whose_second_rename_fails_keeps_the_old_version(tmp_path, monkeypatch, failure):
    """The rename of the new version into place fails (EIO on a network volume; Ctrl-C between the two renames)
    after the old one was moved aside: the old version is put back, not removed with the write's other folders."""
    root = tmp_path / "models"
    write_version(root, 1, "the original")
    real_replace = os.replace

    def second_rename_fails(src, dst):
        if Path(src).name.startswith(".staging-"):  # the second rename: staging -> <version>
            raise failure
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", second_rename_fails)
    with pytest.raises(type(failure)):
        write_version(root, 1, "the overwrite that failed", overwrite=True)
    monkeypatch.undo()
    assert (ModelRepository(root).load(NAME, 1).path / "model.onnx").read_text() == "the original"
    assert hidden(root) == []


def no_file_locks(fd, operation):
    """fcntl.flock on a volume without locks (NFSv3 without its lock manager)."""
    raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))


def test_a_volume_without_file_locks_fails_the_write_clearly_and_leaves_nothing(tmp_path, monkeypatch):
    root = tmp_path / "models"
    (root / NAME).mkdir(parents=True)
    monkeypatch.setattr(repository_writes.fcntl, "flock", no_file_locks)
    before = open_descriptors()
    with pytest.raises(RepositoryError, match="does not support file locks"):
        write_version(root, 1, "never written")
    assert open_descriptors() == before  # the lock file's descriptor was closed
    assert hidden(root) == []  # and the lock file removed


def test_the_version_lock_on_a_volume_without_file_locks_is_refused_the_same_way(tmp_path, monkeypatch):
    write_version(tmp_path, 1, "a version")
    monkeypatch.setattr(repository_writes.fcntl, "flock", no_file_locks)
    before = open_descriptors()
    with pytest.raises(RepositoryError, match="does not support file locks"):
        with ModelRepository(tmp_path).lock(NAME, 1, timeout_s=1):
            pass
    assert open_descriptors() == before


def test_a_write_whose_folders_cannot_be_removed_still_releases_its_lock(tmp_path, monkeypatch):
    """Removing the staging folder fails (EIO): the lock's descriptor is closed all the same, so the next write can
    take the lock and remove what is left."""
    root = tmp_path / "models"

    def removal_fails(path, *args, **kwargs):
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(repository_writes.shutil, "rmtree", removal_fails)
    before = open_descriptors()
    with pytest.raises(OSError, match=os.strerror(errno.EIO)):
        with ModelRepository(root).new_version(NAME, 1) as staged:
            raise OSError(errno.EIO, os.strerror(errno.EIO))  # the export fails, then so does the clean-up
    assert open_descriptors() == before
    monkeypatch.undo()
    assert hidden(root) != []  # what the failed clean-up left, with a lock nobody holds
    write_version(root, 2, "next")
    assert hidden(root) == [] and not staged.path.exists()


def test_a_dead_writes_lock_file_of_another_user_is_still_removed(tmp_path, monkeypatch):
    """A lock file another user's export left (0644: not writable here) is opened read-only, enough for flock."""
    root = tmp_path / "models"
    (root / NAME).mkdir(parents=True)
    dead = root / NAME / ".staging-6-0123456789abcdef.lock"
    dead.touch(mode=0o644)
    real_open = os.open

    def as_another_users_file(path, flags, *args):  # root may write any file: refuse as the kernel would others
        if Path(path) == dead and flags & (os.O_WRONLY | os.O_RDWR):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
        return real_open(path, flags, *args)

    monkeypatch.setattr(os, "open", as_another_users_file)
    write_version(root, 1, "next")
    assert not dead.exists() and hidden(root) == []
