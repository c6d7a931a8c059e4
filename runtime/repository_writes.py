"""A repository write's folders and lock, how a write ends, and the one rule for removing what dead writes leave.

A new version (ModelRepository.new_version: an export) stages its files in hidden folders: `.staging-<version>-<token>`
and, mid-overwrite, `.old-<version>-<token>` (the version it moves aside). A write that dies (SIGKILL, OOM, a lost
node) leaves them behind, and the next new version of that model removes them (adding an engine to a version,
ModelRepository.add_artifact, does not), under one rule that holds across the hosts sharing a repository volume:
every write holds an exclusive flock on `.staging-<version>-<token>.lock` from before its folders exist until after
they are gone, and a folder is removed only by whoever holds its lock. A live write holds it, so its folders are never
touched; flock dies with its process (and on NFSv4 with its client's lease), so a dead write's lock can be taken and
its folders removed. An overwrite that died, or whose second rename failed, between moving the old version aside and
renaming the new one into place gets the old version renamed back, by itself or by the next write. Folders without a
lock file (written before this rule existed) are removed only when nothing in them changed for LEGACY_WRITE_MAX_AGE_S.
A pid check could not do this: pids repeat across hosts and containers.

On NFS, Linux emulates flock with a whole-file byte-range lock on the server: an exclusive one needs the file open for
writing (else EBADF, so lock files are opened read-write where the permissions allow), and a volume mounted with
`nolock` or `local_lock=flock|all` keeps locks on each host, where writes from different hosts no longer exclude each
other (the rule then holds only between processes of one host). A volume that refuses locks (ENOLCK: NFSv3 without
a lock manager) fails a write at its start, with nothing left behind.
"""
from __future__ import annotations

import errno
import fcntl
import logging
import os
import re
import secrets
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from convnext_files import FILE_MODE

# `.staging-<version>-<token>` / `.old-<version>-<token>` folders of a write, `.staging-<version>-<token>.lock` its lock
WRITE_ENTRY = re.compile(r"^\.(?P<kind>staging|old)-(?P<version>\d+)-(?P<token>\w+)(?P<lock>\.lock)?$")
LEGACY_WRITE_MAX_AGE_S = 24 * 3600  # lock-less folders from before the write locks: no export runs a day
# The service may run as another user than the export: it lists and reads what a write creates, whatever the umask.
FOLDER_MODE = 0o755
logger = logging.getLogger("runtime.repository")


@dataclass(frozen=True)
class WritePaths:
    """The paths of one write of `<model folder>/<version>`: the only place their names are spelled."""

    staging: Path  # the new version, until renamed into place
    old: Path  # an overwritten version, moved aside until the new one is in place
    lock: Path  # flock-ed by the write from before its folders exist until after they are gone
    final: Path  # the published version


def write_paths(folder: Path, version: int, token: str) -> WritePaths:
    return WritePaths(staging=folder / f".staging-{version}-{token}", old=folder / f".old-{version}-{token}",
                      lock=folder / f".staging-{version}-{token}.lock", final=folder / str(version))


def make_folders(folder: Path) -> None:
    """`folder` and its missing parents, each created FOLDER_MODE whatever the umask; a folder that exists keeps its
    mode (whoever made it chose it)."""
    missing = []
    while not folder.exists():
        missing.append(folder)
        folder = folder.parent
    for path in reversed(missing):
        try:
            path.mkdir()
        except FileExistsError:  # made meanwhile by another write: its mode is that one's
            continue
        os.chmod(path, FOLDER_MODE)


def share_tree(folder: Path) -> None:
    """Every file under `folder` FILE_MODE and every folder FOLDER_MODE, whatever the umask they were written under
    (onnx.save leaves a model 0600 under umask 077); links are left alone."""
    for root, _, files in os.walk(folder):
        os.chmod(root, FOLDER_MODE)
        for name in files:
            path = os.path.join(root, name)
            if not os.path.islink(path):
                os.chmod(path, FILE_MODE)


def hold_write_lock(folder: Path, version: int) -> tuple[int, WritePaths]:
    """A new write's paths and the descriptor holding its lock file, created here.

    Raises OSError (with nothing left behind) when the file cannot be created or the volume refuses the lock.
    """
    while True:
        paths = write_paths(folder, version, secrets.token_hex(8))
        fd = os.open(paths.lock, os.O_RDWR | os.O_CREAT | os.O_EXCL, FILE_MODE)
        os.fchmod(fd, FILE_MODE)  # not the umask's: another user's write opens it read-only to clean up after it
        try:
            # Still named: a cleaner did not take the new file, folder-less, for a dead write's.
            if lock_now(fd) and _still_named(fd, paths.lock):
                return fd, paths
        except BaseException:  # ENOLCK and the like: this write never began, so its lock file goes too
            os.close(fd)
            paths.lock.unlink(missing_ok=True)
            raise
        os.close(fd)


class LockBusy(Exception):
    """Another process held a lock past the caller's deadline."""


def wait_for_lock(path: Path, timeout_s: float, poll_s: float, on_wait: Callable[[], object] = lambda: None) -> int:
    """A descriptor of the file at `path` (created if missing) holding its exclusive flock, taken within `timeout_s`;
    `on_wait` is called once if another process holds it.

    A lock taken on a file that `path` no longer names guards nothing (an overwrite moved the version folder holding
    it aside while this one waited), so it is dropped and the file now at `path` is locked instead.
    Raises LockBusy past the deadline, OSError when the file cannot be opened or the volume refuses the lock.
    """
    deadline = time.monotonic() + timeout_s
    waited = False
    while True:
        fd = _open_lock_file(path, create=True)
        try:
            while not lock_now(fd):
                if not waited:
                    waited = True
                    on_wait()
                if time.monotonic() >= deadline:
                    raise LockBusy(path)
                time.sleep(poll_s)  # flock has no timeout of its own
            if _still_named(fd, path):
                return fd
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)


def lock_now(fd: int) -> bool:
    """Take the exclusive flock on `fd` unless another open file holds it (False then; other errors are raised)."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def finish_write(paths: WritePaths) -> None:
    """End a write, under its lock: put back a version it moved aside and did not replace, remove its folders, then
    its lock file. The caller closes the lock's descriptor afterwards, whatever this raised."""
    # Staging still there: the new version never went in (a finished overwrite killed while removing its `.old-*`
    # has none, and its half-removed folder must not come back).
    if paths.old.is_dir() and paths.staging.is_dir() and not paths.final.exists():
        try:
            os.rename(paths.old, paths.final)
            logger.warning("%s: put back the version an unfinished overwrite had moved aside", paths.final)
        except OSError as err:
            if err.errno not in (errno.ENOTEMPTY, errno.EEXIST):  # else: a new export published it meanwhile
                raise
    for path in (paths.staging, paths.old):
        remove_tree(path)
    paths.lock.unlink(missing_ok=True)


def _still_named(fd: int, path: Path) -> bool:
    """Whether `path` still names the file open as `fd` (not removed, nor replaced by another)."""
    try:
        return os.stat(path).st_ino == os.fstat(fd).st_ino
    except FileNotFoundError:
        return False


def remove_tree(path: Path) -> None:
    try:
        shutil.rmtree(path)
    except FileNotFoundError:  # already gone, or removed meanwhile by another cleaner
        pass


def _idle_s(folder: Path) -> float:
    """Seconds since anything in `folder` (or the folder itself) last changed."""
    return time.time() - max(p.lstat().st_mtime for p in (folder, *folder.rglob("*")))


def remove_dead_writes(folder: Path) -> None:
    """Remove what writes to this model folder that died left behind (the rule: the module docstring)."""
    writes = {(int(m["version"]), m["token"]) for m in map(WRITE_ENTRY.match, os.listdir(folder)) if m}
    for version, token in sorted(writes):
        try:
            _remove_dead_write(write_paths(folder, version, token))
        except OSError as err:
            logger.warning("could not remove what a dead write left in %s (%s); the next write tries again",
                           folder, err)


def _open_lock_file(path: Path, create: bool = False) -> int:
    """A lock file, to flock: read-write (NFS needs it for an exclusive lock; created if `create`), else read-only (a
    file of another user, 0644, e.g. a version's .lock the service made: enough for flock on a local file system)."""
    try:
        fd = os.open(path, os.O_RDWR | (os.O_CREAT if create else 0), FILE_MODE)
    except PermissionError:
        return os.open(path, os.O_RDONLY)
    if create:  # not the umask's mode (077: 0600): the service, another user, locks a version's .lock read-only
        try:
            os.fchmod(fd, FILE_MODE)
        except PermissionError:  # another user's file: its mode is its owner's
            pass
    return fd


def _remove_dead_write(paths: WritePaths) -> None:
    try:
        fd = _open_lock_file(paths.lock)
    except FileNotFoundError:  # written before the write locks (or finished just now: then nothing is left)
        _remove_lockless(paths)
        return
    try:
        # Not still named: another cleaner finished this write meanwhile.
        if lock_now(fd) and _still_named(fd, paths.lock):  # else a live write holds it
            finish_write(paths)
    finally:
        os.close(fd)  # releases the lock


def _remove_lockless(paths: WritePaths) -> None:
    """A day-old staging folder of an export from before the write locks; its `.old-*` only once the version is
    back in place (unpaired with its staging folder, it cannot tell whether the overwrite died before that)."""
    if paths.staging.is_dir() and _idle_s(paths.staging) > LEGACY_WRITE_MAX_AGE_S:
        remove_tree(paths.staging)
    if paths.old.is_dir() and _idle_s(paths.old) > LEGACY_WRITE_MAX_AGE_S:
        if paths.final.exists():
            remove_tree(paths.old)
        else:
            logger.warning("%s holds %s, which an overwrite that died moved aside: check it and rename it back",
                           paths.old, paths.final.name)
