"""Checkpoints round-trip with weights_only=True (RNG states included), are written atomically, and
checkpoint_last.pth after the best ones."""
import dataclasses
import random
import resource
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from model.checkpoints import read_checkpoint
from training.checkpoint import cuda_state_to_restore, read_for_resume, rng_state, save_atomic, set_rng_state
from training.config import PRESETS
from training.distributed import DistInfo
from training.run import train

ROOT = Path(__file__).resolve().parents[2]


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
    with pytest.raises(OSError, match=r"could not write .*checkpoint_last.pth \(disk full\); the previous one is"):
        save_atomic({"epoch": 2, "bad": Unpicklable()}, path)
    assert read_checkpoint(path)["epoch"] == 1
    # no temp file left behind; the sidecar still matches the surviving file
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint_last.pth", "checkpoint_last.pth.sha256"]


def _file_size_limit(max_bytes: int):
    """A child process's preexec_fn: writes past `max_bytes` fail with EFBIG (File too large), as on a full disk
    they fail with ENOSPC; SIGXFSZ ignored, or the kernel kills the process instead."""

    def limit() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (max_bytes, max_bytes))

    return limit


SAVE_PAST_THE_LIMIT = """
import sys, torch
from training.checkpoint import save_atomic
save_atomic({"epoch": 1}, sys.argv[1])
try:
    save_atomic({"epoch": 2, "w": torch.zeros(4_000_000, dtype=torch.uint8)}, sys.argv[1])
except OSError as error:
    print(error)
"""


def test_a_save_that_hits_a_real_write_limit_names_the_cause_and_keeps_the_previous_file(tmp_path):
    """A real failed write (not a faked exception): torch.save reports it as RuntimeError "unexpected pos"."""
    path = tmp_path / "checkpoint_last.pth"
    result = subprocess.run([sys.executable, "-c", SAVE_PAST_THE_LIMIT, str(path)], cwd=ROOT, capture_output=True,
                            text=True, timeout=120, preexec_fn=_file_size_limit(1_000_000), check=True)
    assert result.stdout.startswith(f"could not write {path} (File too large; "), result.stdout + result.stderr
    assert "MB free on its filesystem): free space or pass another --output; the previous one is intact" in (
        result.stdout)
    assert read_checkpoint(path)["epoch"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint_last.pth", "checkpoint_last.pth.sha256"]


def test_a_run_whose_checkpoint_write_fails_ends_with_one_error_line(tmp_path):
    output = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, "-m", "training", "--preset", "demo", "--epochs", "1", "--max-steps-per-epoch", "1",
         "--batch-size", "8", "--disable-eval", "--quiet", "--output", str(output)],
        cwd=ROOT, capture_output=True, text=True, timeout=180, preexec_fn=_file_size_limit(5_000_000))
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.splitlines()[-1].startswith(
        f"python -m training: error: could not write {output / 'checkpoint_last.pth'} (File too large; ")
    assert not list(output.glob("*.tmp")) and not list(output.glob(".*.tmp"))


def test_resume_from_a_missing_file_says_what_to_pass(tmp_path):
    with pytest.raises(FileNotFoundError, match="--resume"):
        read_for_resume(tmp_path / "nope.pth")


def test_the_cuda_state_restored_is_the_saved_devices_or_an_old_lists_entry_for_this_device(capsys):
    """Decided without a GPU: a single state (this format) is restored as it is; an older checkpoint's list over
    every device the saving process saw gives this device's entry; none is restored where it holds none."""
    states = [torch.full((16,), index, dtype=torch.uint8) for index in range(8)]  # a process that saw 8 GPUs
    assert cuda_state_to_restore(states[5], device_index=0) is states[5]
    assert cuda_state_to_restore(states, device_index=3) is states[3]
    assert cuda_state_to_restore(None, device_index=0) is None  # saved without CUDA (this format)
    assert cuda_state_to_restore([], device_index=0) is None  # saved without CUDA (older format)
    assert capsys.readouterr().err == ""
    assert cuda_state_to_restore(states[:2], device_index=2) is None  # saved where 2 GPUs showed, resumed on cuda:2
    assert "CUDA RNG states for 2 devices and none for cuda:2" in capsys.readouterr().err


def test_the_best_checkpoint_is_written_before_checkpoint_last(tmp_path):
    """checkpoint_last.pth names the best epoch: a crash at its write (here: a folder in its place, so the rename
    fails) must find the best checkpoint already holding that epoch, or a resume trusts a best never saved."""
    output = tmp_path / "run"
    (output / "checkpoint_last.pth").mkdir(parents=True)
    config = dataclasses.replace(PRESETS["demo"], epochs=1, batch_size=8, max_steps_per_epoch=1, ema_decay=0.5,
                                 output=str(output))
    with pytest.raises(IsADirectoryError):
        train(config, DistInfo())
    for name in ("checkpoint_best.pth", "checkpoint_best_ema.pth"):
        best = read_checkpoint(output / name)
        assert best["epoch"] == 0 and best["best"]["epoch"] == best["best"]["ema_epoch"] == 0, name


def test_a_run_removes_the_temporary_files_that_saves_ended_by_a_signal_left(tmp_path, capsys):
    """SIGKILL (or SIGTERM from torchrun / SLURM) during a save leaves replace_atomic's hidden temporary file, up to
    a checkpoint's size; the next run in that folder removes those of its checkpoints and sidecars, nothing else."""
    output = tmp_path / "run"
    output.mkdir()
    left = [".checkpoint_last.pth.k1vhrv2t.tmp", ".checkpoint_best.pth.f79tu5ao.tmp",
            ".checkpoint_last.pth.sha256.0x3ab1c2.tmp"]
    for name in left:
        (output / name).write_bytes(b"\0" * 4096)
    (output / ".notes.tmp").write_text("not a checkpoint's")
    config = dataclasses.replace(PRESETS["demo"], epochs=1, batch_size=8, max_steps_per_epoch=1, disable_eval=True,
                                 quiet=True, output=str(output))
    train(config, DistInfo())
    assert sorted(p.name for p in output.iterdir() if p.name.startswith(".")) == [".notes.tmp"]
    assert "warning: removed 3 temporary file(s) of interrupted checkpoint saves" in capsys.readouterr().err
