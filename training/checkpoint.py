"""Atomic, sha256-verified checkpoints of plain data (loaded with weights_only=True) and RNG states for exact resume."""
from __future__ import annotations

import hashlib
import os
import pickle
import random
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import torch


def rng_state() -> dict:
    """Python, NumPy, torch (and CUDA) RNG states as tensors, lists and ints only."""
    version, state, gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    return {
        "python": [version, list(state), gauss],
        "numpy": [np_name, torch.from_numpy(np_keys.astype(np.int64)), np_pos, np_has_gauss, np_gauss],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = state["numpy"]
    np.random.set_state((np_name, np_keys.numpy().astype(np.uint32), np_pos, np_has_gauss, np_gauss))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class CheckpointError(ValueError):
    """A checkpoint file that is truncated, modified or carries code; never unpickled past the refusal."""


def sidecar_path(path: str | Path) -> Path:
    """`checkpoint_last.pth` -> `checkpoint_last.pth.sha256` (the `sha256sum` line format)."""
    path = Path(path)
    return path.with_name(path.name + ".sha256")


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for chunk in iter(lambda: file.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _replace_atomic(path: Path, write, before_replace=None) -> None:
    """`write(file)` into a temporary file beside `path`, fsync, then os.replace: readers see old or new, never half.

    `before_replace(tmp_path)` runs on the complete temporary file just before the rename.
    """
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as file:
            write(file)
            file.flush()
            os.fsync(file.fileno())
        if before_replace is not None:
            before_replace(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_atomic(checkpoint: dict, path: str | Path) -> None:
    """Write the checkpoint atomically, then its sha256 sidecar atomically; a crash leaves a loadable file.

    The old sidecar goes just before the rename: a kill between the two renames leaves a complete checkpoint with
    no sidecar (loaded unverified, like an older run's), never a new checkpoint beside the old checkpoint's hash.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sidecar = sidecar_path(path)
    digest = []

    def hash_then_drop_old_sidecar(tmp: Path) -> None:
        digest.append(file_sha256(tmp))
        sidecar.unlink(missing_ok=True)

    _replace_atomic(path, lambda file: torch.save(checkpoint, file), hash_then_drop_old_sidecar)
    _replace_atomic(sidecar, lambda file: file.write(f"{digest[0]}  {path.name}\n".encode()))
    _fsync_folder(path.parent)


def _fsync_folder(folder: Path) -> None:
    """Make the renames durable (POSIX); a no-op where folders cannot be opened (Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def recorded_sha256(path: Path) -> str | None:
    """The hash in `path`'s sidecar, or None for a checkpoint without one (older runs, official files)."""
    sidecar = sidecar_path(path)
    if not sidecar.is_file():
        return None
    fields = sidecar.read_text().split()
    if not fields or len(fields[0]) != 64:
        raise CheckpointError(f"{sidecar} is not a sha256 line ('<64 hex digits>  {path.name}'); delete it to "
                              f"load {path} unverified, or resume from an earlier checkpoint")
    return fields[0].lower()


def load(path: str | Path) -> dict:
    """Verify `path` against its sha256 sidecar (when it has one), then torch.load it with weights_only=True."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}; pass the checkpoint_last.pth of an earlier run to --resume")
    expected = recorded_sha256(path)
    if expected is not None and file_sha256(path) != expected:
        raise CheckpointError(f"checkpoint {path} does not match its recorded sha256 ({sidecar_path(path).name}): "
                              "it was modified or partly written; resume from an earlier checkpoint")
    if not zipfile.is_zipfile(path):  # torch.save writes a zip; a cut-off one has lost its central directory
        raise CheckpointError(f"checkpoint {path} is truncated or not a torch.save file ({path.stat().st_size} "
                              "bytes); resume from an earlier checkpoint or re-download it")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise CheckpointError(f"checkpoint {path} holds objects other than tensors and plain data (possibly code), "
                              f"so it was refused unexecuted; use a checkpoint written by this project "
                              f"({str(error).splitlines()[-1][:200]})") from None
    except (RuntimeError, EOFError) as error:
        raise CheckpointError(f"checkpoint {path} is damaged ({str(error).splitlines()[0][:200]}); resume from an "
                              "earlier checkpoint") from None


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The plain module under DDP (`module.`) and torch.compile (`_orig_mod.`)."""
    while True:
        if isinstance(model, torch.nn.parallel.DistributedDataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model
