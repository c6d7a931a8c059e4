"""Atomic checkpoints of plain data with a sha256 sidecar (read back by model.read_checkpoint), and RNG states."""
from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch

from convnext_files import replace_atomic, sha256_file, sidecar_path, write_sidecar
from model.checkpoints import read_checkpoint


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

    replace_atomic(path, lambda file: torch.save(checkpoint, file), hash_then_drop_old_sidecar)
    write_sidecar(path, digest[0])


def read_for_resume(path: str | Path) -> dict:
    """The checkpoint --resume names, read (and verified) by model.read_checkpoint; a missing file gets a hint."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"no checkpoint at {path}; pass the checkpoint_last.pth of an earlier run to --resume")
    return read_checkpoint(path)
