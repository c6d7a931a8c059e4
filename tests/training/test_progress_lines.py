"""Off a terminal, a run prints one progress line per --log-every steps (images/s, ETAs); --quiet prints none.
images/s, there and in log.jsonl, counts every process's images."""
from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch
from torch import nn

from training import engine
from training.engine import EpochSettings, StepPlan, TrainState, train_one_epoch
from training.run_log import StepLines, format_duration, format_step_line

ROOT = Path(__file__).resolve().parents[2]
STEP_LINE = re.compile(r"^epoch (\d+) step (\d+)/4 loss [\d.]+ lr \S+ (\d+) images/s ETA epoch (\w+), run (\w+)$")


def demo_run(tmp_path: Path, *extra: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "training", "--preset", "demo", "--max-steps-per-epoch", "4", "--batch-size",
               "8", "--log-every", "2", "--output", str(tmp_path / "run"), *extra]
    env = os.environ | {"PYTHONPATH": str(ROOT)}
    return subprocess.run(command, capture_output=True, text=True, timeout=180, env=env, check=True)


def test_a_run_off_a_terminal_prints_a_line_per_log_every_steps_with_images_per_s_and_etas(tmp_path):
    stderr = demo_run(tmp_path, "--epochs", "2").stderr  # a pipe: not a terminal
    matches = [m for m in map(STEP_LINE.match, stderr.splitlines()) if m]
    assert [(m[1], m[2]) for m in matches] == [("0", "2"), ("0", "4"), ("1", "2"), ("1", "4")], stderr
    assert all(int(m[3]) > 0 for m in matches)
    assert matches[1][4] == "0s" and matches[3][5] == "0s"  # the end of an epoch / of the run: nothing left
    records = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [r["epoch_step"] for r in records if "loss" in r] == [2, 4, 2, 4]


def test_quiet_prints_no_progress_lines_but_still_the_epoch_records(tmp_path):
    stderr = demo_run(tmp_path, "--epochs", "1", "--quiet").stderr
    assert "images/s" not in stderr and not any(map(STEP_LINE.match, stderr.splitlines())), stderr
    assert any(line.startswith('{"epoch": 0') for line in stderr.splitlines())


def test_durations_are_short():
    assert [format_duration(s) for s in (0, 44.6, 60, 185, 3599, 3600, 7620, -3)] == [
        "0s", "45s", "1m00s", "3m05s", "59m59s", "1h00m", "2h07m", "0s"]


def test_step_line_names_the_epoch_step_loss_rate_and_both_etas():
    record = {"epoch": 3, "epoch_step": 40, "loss": 2.3125, "lr": 0.0012345}
    assert format_step_line(record, 625, 1530.4, 405, 7620) == (
        "epoch 3 step 40/625 loss 2.3125 lr 0.00123 1530 images/s ETA epoch 6m45s, run 2h07m")


def test_run_eta_is_the_epochs_rest_plus_the_remaining_epochs_at_the_last_epochs_wall_time():
    stream = io.StringIO()
    lines = StepLines(steps_per_epoch=10, last_epoch=4, stream=stream)
    lines.epoch_wall_s = 100.0  # a whole epoch, evaluation and checkpoint included
    lines.epoch_started = time.perf_counter() - 10.0  # 5 of 10 steps in 10 s: 2 s a step
    lines({"epoch": 2, "epoch_step": 5, "loss": 1.0, "lr": 1e-3, "images_per_s": 100.0})  # all processes' (logged)
    # 5 steps left (10 s) + epochs 3 and 4 at 100 s; images/s as logged
    assert stream.getvalue() == "epoch 2 step 5/10 loss 1.0000 lr 0.001 100 images/s ETA epoch 10s, run 3m30s\n"


def test_images_per_s_counts_every_processs_images_in_the_step_and_epoch_records(monkeypatch):
    """Two processes simulated in one: the all-reduce sums two equal shares, and each optimizer step takes one second
    of a fake clock. Each process trains 4 images a step: together, 8 images/s (torchrun's 8 GPUs: 8x one's rate)."""
    clock = SimpleNamespace(now=0.0)
    monkeypatch.setattr(engine, "time", SimpleNamespace(perf_counter=lambda: clock.now))
    optimizer_step = engine._optimizer_step

    def one_second_step(state, clip_grad):
        optimizer_step(state, clip_grad)
        clock.now += 1.0

    monkeypatch.setattr(engine, "_optimizer_step", one_second_step)
    monkeypatch.setattr(engine, "all_reduce_sum", lambda values: values * 2)  # the other process: the same totals
    model = nn.Linear(3, 2)
    state = TrainState(model=model, unwrapped=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                       plan=StepPlan(peak_lr=0.1, min_lr=0.0, warmup_steps=0, total_steps=3, steps_per_epoch=3))
    batches = [(torch.randn(4, 3), torch.tensor([0, 1, 0, 1]))] * 3
    records: list[dict] = []
    stats = train_one_epoch(state, nn.CrossEntropyLoss(), batches,
                            EpochSettings(torch.device("cpu"), log_every=1, world_size=2), log=records.append)
    assert [record["images_per_s"] for record in records] == [8.0, 8.0, 8.0]  # log.jsonl, TensorBoard, progress lines
    assert stats["train_images_per_s"] == 8.0  # the epoch record
