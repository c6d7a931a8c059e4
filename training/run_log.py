"""What a run tells its operator: log.jsonl (and TensorBoard), the lr and batch it runs at, a progress bar."""
from __future__ import annotations

import json
import sys
from pathlib import Path

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


def progress_bar(total: int, epoch: int, is_main: bool):
    if not (is_main and sys.stderr.isatty()):
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=f"epoch {epoch}", leave=False)
