"""What a run tells its operator: log.jsonl (and TensorBoard), the lr and batch it runs at, its progress."""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import TextIO

from .config import TrainConfig


class RunLog:
    """JSON lines (log.jsonl) always, TensorBoard when importable; rank 0 only."""

    def __init__(self, output: Path, enabled: bool):
        self.enabled, self.path, self.tb = enabled, output / "log.jsonl", None
        if enabled:
            output.mkdir(parents=True, exist_ok=True)
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                SummaryWriter = None
            if SummaryWriter is not None:
                self.tb = SummaryWriter(str(output / "tb"))

    def __call__(self, record: dict) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as file:
            file.write(json.dumps(record) + "\n")
        if self.tb is not None and "step" in record:
            for key, value in record.items():
                if isinstance(value, (int, float)) and key != "step":
                    self.tb.add_scalar(key, value, record["step"])
            # Written now, as log.jsonl is: the writer's own thread flushes every 2 minutes, and nothing closes it
            # when a run is killed, so the last records of a run would otherwise be lost.
            self.tb.flush()


def announce_batch(config: TrainConfig, world_size: int) -> None:
    """Print the effective lr and total batch; warn when the total batch is not the recipe's (official: 4096 / 512).

    The official main.py takes --lr as given at the recipe's batch; here it is scaled linearly, so another total
    batch still trains, but not the paper's run.
    """
    total, recipe = config.total_batch(world_size), config.lr_ref_batch
    print(f"lr {config.lr(world_size):.4g} at total batch {total} = {config.batch_size} per process x "
          f"{config.accum_steps} accumulation steps x {world_size} processes (preset {config.preset}: "
          f"{config.base_lr:g} at {recipe})", flush=True)
    if total == recipe:
        return
    per_step = config.batch_size * world_size
    hint = (f"; --accum-steps {recipe // per_step} keeps {recipe} at --batch-size {config.batch_size} on "
            f"{world_size} processes" if recipe % per_step == 0 else "")
    print(f"warning: total batch {total} differs from the {config.preset} recipe's {recipe}: the lr is scaled "
          f"linearly to {config.lr(world_size):.4g}, so results are not comparable with the paper's{hint}",
          file=sys.stderr, flush=True)


def progress_bar(total: int, epoch: int, is_main: bool, quiet: bool = False):
    """A tqdm bar on a terminal; None elsewhere (StepLines reports there) and with --quiet."""
    if quiet or not (is_main and sys.stderr.isatty()):
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=f"epoch {epoch}", leave=False)


def format_duration(seconds: float) -> str:
    """`45s`, `3m05s`, `2h07m`: short enough for a log line."""
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def format_step_line(record: dict, steps_per_epoch: int, images_per_s: float, epoch_eta_s: float,
                     run_eta_s: float) -> str:
    """`epoch 3 step 40/625 loss 2.3125 lr 0.00123 1530 images/s ETA epoch 6m45s, run 2h07m`."""
    return (f"epoch {record['epoch']} step {record['epoch_step']}/{steps_per_epoch} loss {record['loss']:.4f} "
            f"lr {record['lr']:.3g} {images_per_s:.0f} images/s ETA epoch {format_duration(epoch_eta_s)}, "
            f"run {format_duration(run_eta_s)}")


class StepLines:
    """One line per logging step (--log-every) on stderr when it is not a terminal (nohup, CI, pipes); rank 0.

    Fed the logging steps' records, so it adds no device sync; their images/s is already over all processes. The
    run's ETA is the epoch's plus the remaining epochs at the last whole epoch's wall time (evaluation and
    checkpoints included), or at this epoch's step rate before one has finished.
    """

    def __init__(self, steps_per_epoch: int, last_epoch: int, stream: TextIO | None = None):
        self.steps_per_epoch, self.last_epoch = steps_per_epoch, last_epoch
        self.stream = stream or sys.stderr
        self.epoch_started = time.perf_counter()
        self.epoch_wall_s: float | None = None

    def start_epoch(self) -> None:
        self.epoch_started = time.perf_counter()

    def finish_epoch(self) -> None:
        self.epoch_wall_s = time.perf_counter() - self.epoch_started

    def __call__(self, record: dict) -> None:
        step_s = (time.perf_counter() - self.epoch_started) / max(record["epoch_step"], 1)
        epoch_eta_s = (self.steps_per_epoch - record["epoch_step"]) * step_s
        epoch_wall_s = self.epoch_wall_s if self.epoch_wall_s is not None else self.steps_per_epoch * step_s
        run_eta_s = epoch_eta_s + (self.last_epoch - record["epoch"]) * epoch_wall_s
        line = format_step_line(record, self.steps_per_epoch, record["images_per_s"], epoch_eta_s, run_eta_s)
        print(line, file=self.stream, flush=True)


def step_lines(steps_per_epoch: int, last_epoch: int, is_main: bool, quiet: bool) -> StepLines | None:
    """StepLines where no progress bar shows: rank 0, stderr not a terminal, not --quiet."""
    if quiet or not is_main or sys.stderr.isatty():
        return None
    return StepLines(steps_per_epoch, last_epoch)
