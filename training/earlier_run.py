"""An earlier run's files in --output: refused to a new run that did not opt in, removed when a run starts over."""
from __future__ import annotations

import sys
from pathlib import Path

from convnext_files import sidecar_path

from .checkpoint import CHECKPOINT_NAMES
from .config import TrainConfig

# What a run writes into --output besides its checkpoints: a new run's lines would be mixed with an earlier run's.
RECORD_NAMES = ("config.json", "log.jsonl")
TENSORBOARD_EVENTS = "tb/events.out.tfevents.*"  # SummaryWriter's files; a new writer adds its own beside them


def refuse_an_earlier_runs_output(config: TrainConfig) -> None:
    """A new run into an --output that holds an earlier run's checkpoints would replace them from epoch 0 (a
    re-applied Job or a rerun command without --resume): refused, on every process, before any work.

    A folder can hold best checkpoints but no checkpoint_last.pth: the first epoch writes the best ones first, so a
    kill between those writes leaves them alone (or someone removed the last one to save space).

    A run that starts over is refused too when it contradicts itself: with --resume (which continues the run), or
    with a --finetune that is one of the checkpoints it removes (rank 0 removes it while the other processes may still
    be loading it, and it is gone after the run).
    """
    if config.overwrite_checkpoints:
        refuse_a_start_over_that_needs_the_earlier_run(config)
    if config.resume or config.overwrite_checkpoints:
        return
    output = Path(config.output)
    last = output / "checkpoint_last.pth"
    if last.is_file():
        raise ValueError(f"--output {config.output} holds an earlier run's checkpoint_last.pth: pass --resume {last} "
                         "to continue that run, --overwrite-checkpoints to start over and replace its checkpoints, or "
                         "another --output")
    best = [name for name in CHECKPOINT_NAMES if (output / name).is_file()]
    if best:
        raise ValueError(f"--output {config.output} holds an earlier run's {' and '.join(best)} but no "
                         f"checkpoint_last.pth (a run stopped during its first save?): pass --resume "
                         f"{output / best[0]} to continue from it, --overwrite-checkpoints to start over and remove "
                         "them, or another --output")


def refuse_a_start_over_that_needs_the_earlier_run(config: TrainConfig) -> None:
    output = Path(config.output)
    if config.resume:
        raise ValueError(f"--resume {config.resume} continues the run in --output {config.output} and "
                         "--overwrite-checkpoints starts a new one there, removing its checkpoints: pass one of them")
    removed = {(output / name).resolve() for name in CHECKPOINT_NAMES}
    if config.finetune and Path(config.finetune).resolve() in removed:
        raise ValueError(f"--finetune {config.finetune} is one of the checkpoints --overwrite-checkpoints removes from "
                         f"--output {config.output} as this run starts over: copy it out of that folder and pass the "
                         "copy, or pass another --output")


def earlier_run_files(output: Path) -> list[Path]:
    """What an earlier run left in `output` that a run starting there would not all rewrite: its checkpoints (a run
    without EMA or eval writes no best ones) with their sha256 sidecars, config.json, log.jsonl (appended to) and
    TensorBoard event files."""
    names = [*CHECKPOINT_NAMES, *(sidecar_path(name).name for name in CHECKPOINT_NAMES), *RECORD_NAMES]
    return [*(output / name for name in names if (output / name).is_file()), *sorted(output.glob(TENSORBOARD_EVENTS))]


def remove_an_earlier_runs_files(output: Path) -> None:
    """Remove them at the start of a run without --resume, on the process that writes, and say so in one line:
    left there, a file of the earlier run would be taken for this run's (`serve --checkpoint
    runs/X/checkpoint_best_ema.pth` serving the earlier run's EMA weights, log.jsonl holding both runs' lines).

    Checkpoints reach here only with --overwrite-checkpoints (refuse_an_earlier_runs_output); the records of a run
    that saved none are removed without it, as there is nothing to resume.
    """
    files = earlier_run_files(output)
    if not files:
        return
    for path in files:
        path.unlink()
    events = [path for path in files if path.parent.name == "tb"]
    named = [path.name for path in files if path not in events and not path.name.endswith(".sha256")]
    listed = ", ".join([*named, *([f"{len(events)} TensorBoard event file(s) in tb/"] if events else [])])
    print(f"warning: this run starts over in {output}: removed the earlier run's {listed}", file=sys.stderr,
          flush=True)
