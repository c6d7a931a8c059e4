"""What dead writes leave in a model's folder is removed by the next write; a live write's folders never are.

The writers are real processes (tests/export/repository_write_worker.py), killed with a real SIGKILL.
"""
from __future__ import annotations

import fcntl
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from runtime.repository import ModelRepository
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
    wait_until_staged(writer, ready)
    left = hidden(root)
    assert [n for n in left if n.startswith(".staging-1-") and not n.endswith(".lock")], left
    writer.send_signal(signal.SIGKILL)
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
