"""What dead writes to a model repository leave behind, and the one rule for removing it safely.

A write that dies (SIGKILL, OOM, a lost node) leaves its hidden folders behind: `.staging-<version>-<token>` and,
mid-overwrite, `.old-<version>-<token>` (the version it moved aside). The next write to that model removes them,
under one rule that holds across the hosts sharing a repository volume: every write holds an exclusive flock on
`.staging-<version>-<token>.lock` from before its folders exist until after they are gone, and a folder is removed
only by whoever holds its lock. A live write holds it, so its folders are never touched; flock dies with its process
(and on NFSv4 with its client's lease), so a dead write's lock can be taken and its folders removed. A write that
died between moving the old version aside and renaming its own into place has its old version renamed back. Folders
without a lock file (written before this rule existed) are removed only when nothing in them changed for
LEGACY_WRITE_MAX_AGE_S. A pid check could not do this: pids repeat across hosts and containers.
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
from pathlib import Path

# `.staging-<version>-<token>` / `.old-<version>-<token>` folders of a write, `.staging-<version>-<token>.lock` its lock
WRITE_ENTRY = re.compile(r"^\.(?P<kind>staging|old)-(?P<version>\d+)-(?P<token>\w+)(?P<lock>\.lock)?$")
LEGACY_WRITE_MAX_AGE_S = 24 * 3600  # lock-less folders from before the write locks: no export runs a day
logger = logging.getLogger("runtime.repository")


def hold_write_lock(folder: Path, version: int) -> tuple[int, str]:
    """A new write's token and the descriptor holding its lock, `.staging-<version>-<token>.lock`, created here."""
    while True:
        token = secrets.token_hex(8)
        path = folder / f".staging-{version}-{token}.lock"
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            if _still_named(fd, path):  # a cleaner did not take the new file, folder-less, for a dead write's
                return fd, token
        except BlockingIOError:
            pass
        os.close(fd)


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
            _remove_dead_write(folder, version, token)
        except OSError as err:
            logger.warning("could not remove what a dead write left in %s (%s); the next write tries again",
                           folder, err)


def _remove_dead_write(folder: Path, version: int, token: str) -> None:
    staging, old = folder / f".staging-{version}-{token}", folder / f".old-{version}-{token}"
    lock, final = folder / f".staging-{version}-{token}.lock", folder / str(version)
    try:
        fd = os.open(lock, os.O_RDWR)
    except FileNotFoundError:  # written before the write locks (or finished just now: then nothing is left)
        _remove_lockless(staging, old, final)
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return  # a live write
        if not _still_named(fd, lock):  # another cleaner finished this write meanwhile
            return
        if old.is_dir() and staging.is_dir() and not final.exists():  # died between its two renames
            try:
                os.rename(old, final)
                logger.warning("%s: put back the version a dead overwrite had moved aside", final)
            except OSError as err:
                if err.errno not in (errno.ENOTEMPTY, errno.EEXIST):  # else: a new export published it meanwhile
                    raise
        for path in (staging, old):
            remove_tree(path)
        lock.unlink()
    finally:
        os.close(fd)  # releases the lock


def _remove_lockless(staging: Path, old: Path, final: Path) -> None:
    """A day-old staging folder of an export from before the write locks; its `.old-*` only once the version is
    back in place (unpaired with its staging folder, it cannot tell whether the overwrite died before that)."""
    if staging.is_dir() and _idle_s(staging) > LEGACY_WRITE_MAX_AGE_S:
        remove_tree(staging)
    if old.is_dir() and _idle_s(old) > LEGACY_WRITE_MAX_AGE_S:
        if final.exists():
            remove_tree(old)
        else:
            logger.warning("%s holds %s, which an overwrite that died moved aside: check it and rename it back",
                           old, final.name)
