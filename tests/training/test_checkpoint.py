"""Checkpoints round-trip with weights_only=True (RNG states included) and are written atomically."""
import random

import numpy as np
import pytest
import torch

from model.checkpoints import read_checkpoint
from training.checkpoint import read_for_resume, rng_state, save_atomic, set_rng_state


def test_round_trip_with_weights_only_restores_every_rng(tmp_path):
    state = {"model": {"w": torch.randn(3)}, "epoch": 2, "rng": rng_state(), "config": {"lr": 1e-3}}
    save_atomic(state, tmp_path / "c.pth")
    loaded = torch.load(tmp_path / "c.pth", weights_only=True)
    expected = (random.random(), np.random.rand(), torch.rand(1))
    set_rng_state(loaded["rng"])
    assert (random.random(), np.random.rand()) == expected[:2]
    assert torch.equal(torch.rand(1), expected[2])
    assert torch.equal(loaded["model"]["w"], state["model"]["w"]) and loaded["epoch"] == 2


class Unpicklable:
    def __reduce__(self):
        raise RuntimeError("disk full")


def test_a_failing_save_leaves_the_previous_file_intact(tmp_path):
    path = tmp_path / "checkpoint_last.pth"
    save_atomic({"epoch": 1}, path)
    with pytest.raises(RuntimeError, match="disk full"):
        save_atomic({"epoch": 2, "bad": Unpicklable()}, path)
    assert read_checkpoint(path)["epoch"] == 1
    # no temp file left behind; the sidecar still matches the surviving file
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint_last.pth", "checkpoint_last.pth.sha256"]


def test_resume_from_a_missing_file_says_what_to_pass(tmp_path):
    with pytest.raises(FileNotFoundError, match="--resume"):
        read_for_resume(tmp_path / "nope.pth")
