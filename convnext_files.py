"""File helpers every package shares (torch-free): a file's sha256, its `sha256sum` sidecar, atomic replacement."""
from __future__ import annotations

import hashlib
import os
import re
import tempfile
from collections.abc import Callable
from pathlib import Path, PurePath
from typing import BinaryIO

CHUNK_BYTES = 1 << 20
# mkstemp creates 0600; the files are read by other users (the service may run as another user than the export).
FILE_MODE = 0o644
# What every training run writes into its --output folder (training/checkpoint.py): names that say no model. Each
# maps to what its model name adds to the run folder's: the best weights are the run's model, the others apart.
TRAINING_CHECKPOINT_SUFFIXES = {"checkpoint_best.pth": "", "checkpoint_best_ema.pth": "-ema",
                                "checkpoint_last.pth": "-last"}
TRAINING_CHECKPOINT_NAMES = tuple(TRAINING_CHECKPOINT_SUFFIXES)


def checkpoint_name_part(path: PurePath) -> str:
    """The part of a checkpoint's path (or URL path) that names its model: the file's stem, but for the files every
    training run writes the run folder's, with the file's kind (runs/t/checkpoint_best.pth -> t, checkpoint_last.pth
    -> t-last, checkpoint_best_ema.pth -> t-ema), so that two runs' checkpoint_best.pth are two models, not two
    versions of one that a watcher would switch between, and a deploy moved from a run's last to its best weights
    prepares the best rather than finding the name taken."""
    if path.name in TRAINING_CHECKPOINT_SUFFIXES and path.parent.name:
        return path.parent.name + TRAINING_CHECKPOINT_SUFFIXES[path.name]
    return path.stem


def sha256_file(path: str | Path) -> str:
    """The hex sha256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while chunk := file.read(CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def sidecar_path(path: str | Path) -> Path:
    """`checkpoint_last.pth` -> `checkpoint_last.pth.sha256` (the `sha256sum` line format)."""
    path = Path(path)
    return path.with_name(path.name + ".sha256")


class SidecarError(ValueError):
    """A `.sha256` sidecar that is not a `sha256sum` line (empty, cut off, edited): not a record of anything."""


def recorded_sha256(path: str | Path) -> str | None:
    """The hash in `path`'s sidecar, or None for a file without one (older runs, other projects' files).

    The one sidecar parser (checkpoints, the pretrained download's cache, deploy's prepare): a sidecar that is not a
    `sha256sum` line raises SidecarError rather than passing for a record.
    """
    path = Path(path)
    sidecar = sidecar_path(path)
    if not sidecar.is_file():
        return None
    fields = sidecar.read_text(errors="replace").split()
    if not fields or not re.fullmatch(r"[0-9a-fA-F]{64}", fields[0]):
        raise SidecarError(f"{sidecar} is not a sha256 line ('<64 hex digits>  {path.name}'); delete it to "
                           f"load {path} unverified, or use an earlier checkpoint")
    return fields[0].lower()


def write_sidecar(path: str | Path, sha256: str) -> None:
    """Write `path`'s sidecar atomically: one `sha256sum` line, `<hex>  <file name>`."""
    path = Path(path)
    write_bytes_atomic(sidecar_path(path), f"{sha256}  {path.name}\n".encode())


TEMPORARY_SUFFIX = ".tmp"


def _temporary_prefix(path: Path) -> str:
    return f".{path.name}."


def interrupted_writes(path: str | Path) -> list[Path]:
    """The temporary files replace_atomic left beside `path` when a signal ended it mid-write (`.<name>.<random>.tmp`,
    for `path` or for a file whose name starts with `path`'s and a dot, as its .sha256 sidecar)."""
    path = Path(path)
    return sorted(p for p in path.parent.glob(f"{_temporary_prefix(path)}*{TEMPORARY_SUFFIX}") if p.is_file())


def replace_atomic(path: str | Path, write: Callable[[BinaryIO], object],
                   before_replace: Callable[[Path], object] | None = None) -> None:
    """`write(file)` into a temporary file beside `path`, fsync it, os.replace it over `path`, fsync the folder.

    Readers see the old file or the new one, never half of one, and the rename survives a power cut.
    `before_replace(tmp_path)` runs on the complete temporary file just before the rename.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=_temporary_prefix(path), suffix=TEMPORARY_SUFFIX, dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as file:
            write(file)
            file.flush()
            os.fsync(file.fileno())
        os.chmod(tmp, FILE_MODE)
        if before_replace is not None:
            before_replace(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_folder(path.parent)


def write_bytes_atomic(path: str | Path, data: bytes) -> None:
    """`data` as the new content of `path`, replaced atomically (see replace_atomic)."""
    replace_atomic(path, lambda file: file.write(data))


def write_text_atomic(path: str | Path, text: str) -> None:
    """`text` (UTF-8) as the new content of `path`, replaced atomically (see replace_atomic)."""
    write_bytes_atomic(path, text.encode())


def fsync_folder(folder: str | Path) -> None:
    """Make renames in `folder` durable (POSIX); a no-op where folders cannot be opened (Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(folder: str | Path) -> None:
    """Make every file under `folder`, and the folders' entries, durable before something names them (a manifest
    written after the files it lists: a power cut must not leave it beside truncated ones). POSIX; folders that cannot
    be opened (Windows) are skipped, as in fsync_folder."""
    for root, _, files in os.walk(folder, topdown=False):
        for name in files:
            path = os.path.join(root, name)
            if os.path.islink(path) or not os.path.isfile(path):
                continue
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_folder(root)
