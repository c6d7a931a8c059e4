"""--resume: load a run's checkpoint_last.pth into a freshly built run (weights, optimizer, EMA, scaler, schedule,
best, each process's RNG streams)."""
from __future__ import annotations

import sys

from . import checkpoint as ckpt
from .distributed import DistInfo
from .engine import StepPlan, TrainState


def resume(path: str, state: TrainState, dist_info: DistInfo, seed: int) -> tuple[int, dict]:
    """Load checkpoint `path` into `state`; returns its last complete epoch and its `best` record."""
    saved = ckpt.read_for_resume(path)
    state.unwrapped.load_state_dict(saved["model"])
    state.optimizer.load_state_dict(saved["optimizer"])
    if state.ema is not None and "model_ema" in saved:
        state.ema.load_state_dict(saved["model_ema"])
    elif state.ema is not None:  # EMA turned on at resume: it starts from the weights (official auto_load_model)
        state.ema.load_state_dict(saved["model"])
        if dist_info.is_main:
            print(f"warning: {path} has no EMA weights (its run had no EMA); the EMA starts from its weights",
                  file=sys.stderr, flush=True)
    if state.scaler is not None and saved.get("scaler"):
        state.scaler.load_state_dict(saved["scaler"])
    state.plan.step = resumed_step(saved, state.plan, dist_info.is_main)
    restore_rng(saved["rng"], dist_info, seed, saved["epoch"])
    return saved["epoch"], saved["best"]


def resumed_step(saved: dict, plan: StepPlan, is_main: bool) -> int:
    """The start of the epoch after the checkpoint's in this run's plan, as the official epoch * steps_per_epoch.

    Not the saved step count: batch size, process count, accumulation or --max-steps-per-epoch may have changed the
    steps per epoch, and the lr would then be elsewhere in this plan's schedule. The same count when nothing changed.
    """
    step = (saved["epoch"] + 1) * plan.steps_per_epoch
    if step != saved["step"] and is_main:
        print(f"warning: the checkpoint's run took {saved['step']} optimizer steps through epoch {saved['epoch']}, "
              f"this run takes {plan.steps_per_epoch} per epoch: its lr schedule continues at step {step} of "
              f"{plan.total_steps}, the start of epoch {saved['epoch'] + 1}", file=sys.stderr, flush=True)
    return step


def restore_rng(saved, dist_info: DistInfo, seed: int, epoch: int) -> None:
    """Each process continues its own RNG streams; with another process count, fresh per-rank seeds instead."""
    states = [saved] if isinstance(saved, dict) else list(saved)  # a dict: one process (older checkpoints)
    if len(states) == dist_info.world_size:
        ckpt.set_rng_state(states[dist_info.rank])
        return
    ckpt.seed_everything(seed + 1000 * (epoch + 1) + dist_info.rank)
    if dist_info.is_main:
        print(f"warning: the checkpoint holds RNG states for {len(states)} processes, this run has "
              f"{dist_info.world_size}: augmentation, Mixup/CutMix and drop-path draws are re-seeded, so the run "
              "continues correctly but not bit for bit", file=sys.stderr, flush=True)
