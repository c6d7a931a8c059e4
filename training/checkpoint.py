"""Atomic checkpoints of plain data with a sha256 sidecar (read back by model.read_checkpoint), and RNG states."""
from __future__ import annotations

import errno
import random
import shutil
import sys
from pathlib import Path

import numpy as np
import torch

from convnext_files import (
    TRAINING_CHECKPOINT_NAMES,
    interrupted_writes,
    replace_atomic,
    sha256_file,
    sidecar_path,
    write_sidecar,
)
from model.checkpoints import read_checkpoint

# What a run writes in --output: checkpoint_last.pth for --resume, the best val top-1 and best EMA val top-1 ones.
CHECKPOINT_NAMES = TRAINING_CHECKPOINT_NAMES
# A full disk, a file-size limit, a full quota: free space (or write elsewhere) and the save works.
SPACE_ERRNOS = frozenset({errno.ENOSPC, errno.EFBIG, errno.EDQUOT})


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_state() -> dict:
    """Python, NumPy, torch (and CUDA) RNG states as tensors, lists and ints only.

    CUDA: the current device's generator only, the one this process draws from (a process sets its device to its
    local rank before any draw). All devices' states would not restore where the process sees fewer GPUs.
    """
    version, state, gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    return {
        "python": [version, list(state), gauss],
        "numpy": [np_name, torch.from_numpy(np_keys.astype(np.int64)), np_pos, np_has_gauss, np_gauss],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
    }


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = state["numpy"]
    np.random.set_state((np_name, np_keys.numpy().astype(np.uint32), np_pos, np_has_gauss, np_gauss))
    torch.set_rng_state(state["torch"])
    if torch.cuda.is_available():
        cuda_state = cuda_state_to_restore(state["cuda"], torch.cuda.current_device())
        if cuda_state is not None:
            torch.cuda.set_rng_state(cuda_state)


def cuda_state_to_restore(saved, device_index: int) -> torch.Tensor | None:
    """The CUDA generator state for device `device_index` in a checkpoint's `cuda` entry, or None when it holds none.

    Newer checkpoints hold the saving process's own device's state; older ones a list over every device it saw, of
    which the entry of the device it ran on (this process's, on the same launch layout) is the one it drew from.
    """
    if saved is None or isinstance(saved, torch.Tensor):
        return saved
    if not saved:  # an older checkpoint of a process without CUDA
        return None
    if device_index < len(saved):
        return saved[device_index]
    print(f"warning: the checkpoint holds CUDA RNG states for {len(saved)} devices and none for cuda:{device_index}: "
          "GPU-side draws start from this run's seed, so the run continues correctly but not bit for bit",
          file=sys.stderr, flush=True)
    return None


def save_atomic(checkpoint: dict, path: str | Path) -> None:
    """Write the checkpoint atomically, then its sha256 sidecar atomically; a crash leaves a loadable file.

    The old sidecar goes just before the rename: a kill between the two renames leaves a complete checkpoint with
    no sidecar (loaded unverified, like an older run's), never a new checkpoint beside the old checkpoint's hash.
    model.read_checkpoint is the reader that verifies it.
    """
    digest = []

    def hash_then_drop_old_sidecar(tmp: Path) -> None:
        digest.append(sha256_file(tmp))
        sidecar_path(path).unlink(missing_ok=True)

    try:
        replace_atomic(path, lambda file: torch.save(checkpoint, file), hash_then_drop_old_sidecar)
    except (OSError, RuntimeError) as error:  # torch.save turns a failed write into RuntimeError "unexpected pos"
        cause = _os_error_in(error)
        if isinstance(error, OSError) and (cause is None or cause.errno not in SPACE_ERRNOS):
            raise  # a permission, a folder in the way: its own message names the path
        raise OSError(_write_failure(Path(path), error, cause)) from error
    write_sidecar(path, digest[0])


def _os_error_in(error: BaseException) -> OSError | None:
    """The OSError behind `error`: itself, or the one torch.save's RuntimeError carries as its context."""
    cause: BaseException | None = error
    while cause is not None and not (isinstance(cause, OSError) and cause.errno):
        cause = cause.__context__
    return cause if isinstance(cause, OSError) else None


def _write_failure(path: Path, error: BaseException, cause: OSError | None) -> str:
    """What a failed checkpoint write says: why, the space left when space ran out, and that the file there is still
    the previous one (the temporary file is gone)."""
    previous = "the previous one is intact" if path.is_file() else "no earlier one was replaced"
    if cause is None:
        return f"could not write {path} ({str(error).splitlines()[0][:200]}); {previous}"
    if cause.errno not in SPACE_ERRNOS:
        return f"could not write {path} ({cause.strerror}); {previous}"
    free_mb = shutil.disk_usage(path.parent).free / 1e6
    return (f"could not write {path} ({cause.strerror}; {free_mb:,.0f} MB free on its filesystem): free space or "
            f"pass another --output; {previous}")


def remove_interrupted_writes(output: Path) -> list[Path]:
    """Remove the temporary files of checkpoint saves that a signal ended mid-write (replace_atomic's
    `.<name>.<random>.tmp`, a checkpoint's or its sidecar's): hidden, up to a checkpoint's size, never read, and
    no later save reuses their random names. Call it before a run's first save, on the one process that saves."""
    stale = [path for name in CHECKPOINT_NAMES for path in interrupted_writes(output / name)]
    for path in stale:
        path.unlink(missing_ok=True)
    return stale


def read_for_resume(path: str | Path) -> dict:
    """The checkpoint --resume names, read (and verified) by model.read_checkpoint; a missing file gets a hint."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"no checkpoint at {path}; pass the checkpoint_last.pth of an earlier run to --resume")
    return read_checkpoint(path)
