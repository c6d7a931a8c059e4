"""`make demo-model` resumes the demo's interrupted run rather than starting over (which training refuses): from
checkpoint_last.pth, else a best checkpoint (a kill during the first epoch's save leaves only those). Real make on a
copy of the Makefile, its venv's python a stand-in that records the commands."""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
from compose_yaml import ROOT

RECORDING_PYTHON = '#!/bin/sh\necho "$@" >> "$(dirname "$0")/../../calls.txt"\n'


def training_command(folder: Path, run_files: list[str]) -> str:
    """The `python -m training` command `make demo-model` runs in a checkout whose runs/demo holds `run_files`."""
    shutil.copy(ROOT / "Makefile", folder / "Makefile")
    for name in ["pyproject.toml", "locks/dev.txt", *(f"runs/demo/{name}" for name in run_files)]:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(name)
    python = folder / ".venv" / "bin" / "python"
    python.parent.mkdir(parents=True)
    python.write_text(RECORDING_PYTHON)
    python.chmod(0o755)
    (folder / ".venv" / ".installed").touch()  # newer than pyproject.toml and the lock: installed
    subprocess.run(["make", "-C", str(folder), "demo-model"], check=True, capture_output=True, text=True, timeout=60,
                   env={k: v for k, v in os.environ.items() if not k.startswith("MAKE")})
    return next(line for line in (folder / "calls.txt").read_text().splitlines() if line.startswith("-m training"))


@pytest.mark.parametrize(("run_files", "resumed"), [
    ([], None),
    (["checkpoint_best.pth", "checkpoint_best_ema.pth", "checkpoint_last.pth"], "checkpoint_last.pth"),
    (["checkpoint_best.pth", "checkpoint_best_ema.pth"], "checkpoint_best.pth"),
    (["checkpoint_best_ema.pth"], "checkpoint_best_ema.pth"),
])
def test_demo_model_resumes_from_the_last_checkpoint_else_a_best_one(tmp_path, run_files, resumed):
    command = training_command(tmp_path, run_files)
    assert command.startswith("-m training --preset demo --output runs/demo")
    assert command.endswith(f" --resume runs/demo/{resumed}" if resumed else "--output runs/demo"), command
