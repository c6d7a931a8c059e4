"""`python -m training` SIGKILLed at a checkpoint and mid-epoch resumes from its last complete checkpoint, exactly."""
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from model.checkpoints import read_checkpoint

# Tiny and fast: 4 epochs of 2 steps at batch 8 on the offline digits demo. Four, so that after either first
# kill point (epoch 0 or 1 saved) the resumed run still has a whole epoch after the one the second kill targets.
FLAGS = {"epochs": 4, "warmup_epochs": 1.0, "batch_size": 8, "max_steps_per_epoch": 2, "ema_decay": 0.9,
         "base_lr": 1e-3, "lr_ref_batch": 8, "scale_min": 0.5, "log_every": 1}


def _cli(output: Path, resume: Path | None = None) -> list[str]:
    argv = [sys.executable, "-m", "training", "--preset", "demo", "--output", str(output)]
    for name, value in FLAGS.items():
        argv += ["--" + name.replace("_", "-"), str(value)]
    return argv + (["--resume", str(resume)] if resume else [])


def _kill_when(argv: list[str], ready, timeout_s: float = 120) -> None:
    """Start the CLI, SIGKILL it the moment `ready()` holds (polled every 5 ms); fail if it ends first."""
    process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + timeout_s
    try:
        while not ready():
            assert process.poll() is None, "the run finished before the kill point: nothing was interrupted"
            assert time.monotonic() < deadline, "the kill point never came"
            time.sleep(0.005)
        process.send_signal(signal.SIGKILL)
    finally:
        process.kill()
        process.wait(30)


def _step_records(output: Path) -> list[dict]:
    log = output / "log.jsonl"
    text = log.read_text() if log.exists() else ""
    return [json.loads(line) for line in text.split("\n")[:-1] if line]  # whole lines: one being written has no "\n"


def _step_logged(output: Path, epoch: int, after: int):
    """For _kill_when: whether an optimizer step of `epoch` is logged past the log's first `after` records."""
    return lambda: any(r.get("epoch") == epoch and "step" in r and "val_top1" not in r
                       for r in _step_records(output)[after:])


@pytest.mark.timeout(300)
def test_sigkill_at_a_checkpoint_and_mid_epoch_then_resume_equals_an_uninterrupted_run(tmp_path):
    run = tmp_path / "killed"
    last = run / "checkpoint_last.pth"
    # Kill 1: the moment the first checkpoint appears (the sidecar may not be written yet).
    _kill_when(_cli(run), last.exists)
    epoch_before = read_checkpoint(last)["epoch"]
    assert epoch_before in (0, 1)
    # A half-written temporary file from a kill during a save is never what --resume reads.
    (run / "checkpoint_last.pth.abc123.tmp").write_bytes(last.read_bytes()[:100])
    # Kill 2: mid-epoch of the resumed run, the moment its first optimizer step of the next epoch is logged. Should
    # the run still finish that epoch and save before the kill lands (a stalled machine), the kill was not mid-epoch:
    # aim at the epoch after, once (four epochs leave one, whichever epoch kill 1 left).
    for _ in range(2):
        epoch_before = read_checkpoint(last)["epoch"]
        _kill_when(_cli(run, resume=last), _step_logged(run, epoch_before + 1, after=len(_step_records(run))))
        if read_checkpoint(last)["epoch"] == epoch_before:  # still the complete, verified checkpoint before the epoch
            break
    else:
        pytest.fail("both kills landed after the epoch's checkpoint: no mid-epoch kill was exercised")
    subprocess.run(_cli(run, resume=last), check=True, timeout=120, capture_output=True)

    resumed = read_checkpoint(last)
    assert (resumed["epoch"], resumed["step"]) == (3, 8)
    # The uninterrupted reference runs the same CLI in a fresh process, like the killed runs (no state left in
    # this test process by earlier tests, such as torch's thread count, can change its arithmetic).
    subprocess.run(_cli(tmp_path / "full"), check=True, timeout=120, capture_output=True)
    full = read_checkpoint(tmp_path / "full" / "checkpoint_last.pth")
    assert (full["epoch"], full["step"]) == (3, 8)
    for part in ("model", "model_ema"):
        for key, value in full[part].items():
            torch.testing.assert_close(resumed[part][key], value, atol=1e-5, rtol=0, msg=f"{part}.{key}")
