"""--resume: load a run's checkpoint_last.pth into a freshly built run (weights, optimizer, EMA, scaler, schedule,
best, each process's RNG streams)."""
from __future__ import annotations

import sys

from model import CheckpointError, trained_activation

from . import checkpoint as ckpt
from .distributed import DistInfo
from .engine import StepPlan, TrainState

# What a checkpoint needs for --resume besides its weights: an official release, a timm file or a bare state dict
# has none of them.
TRAINING_KEYS = ("model", "optimizer", "epoch", "step", "rng", "best", "model_name", "model_kwargs")
# The model_kwargs that make the weights mean something else (drop path, head init and the layer-scale init value
# only shape a run's start or its regularisation: a resumed run may change them, as its flags say).
SAME_MODEL_KWARGS = ("num_classes", "in_chans", "activation")
RESUME_HINT = ("--resume continues a run from its checkpoint_last.pth; to start a new run from a file's weights, use "
               "--finetune")


def resume(path: str, state: TrainState, meta: dict, dist_info: DistInfo, seed: int) -> tuple[int, dict]:
    """Load checkpoint `path` into `state`; returns its last complete epoch and its `best` record.

    Refuses (CheckpointError) a file that is not a training checkpoint, or one of another model, class count or
    class list than this run's `meta` (model name, kwargs and class names, as checkpoints record them).
    """
    saved = ckpt.read_for_resume(path)
    check_resumable(saved, path, meta)
    changed = load_weights(state, saved, path, meta["model_name"])
    if changed and dist_info.is_main:
        print(f"warning: this run's optimizer settings replace {path}'s: {', '.join(changed)}", file=sys.stderr,
              flush=True)
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


def check_resumable(saved: dict, path: str, meta: dict) -> None:
    """The checkpoint holds a run's training state, of the model, classes and inputs this run builds."""
    missing = [key for key in TRAINING_KEYS if key not in saved]
    if missing:
        raise CheckpointError(f"{path} is not a training checkpoint (it has no {', '.join(missing)}: a weights-only "
                              f"file, such as an official release?); {RESUME_HINT}")
    theirs, ours = _identity(saved["model_name"], saved["model_kwargs"]), _identity(meta["model_name"],
                                                                                   meta["model_kwargs"])
    differences = [f"{name} {theirs[name]} (this run: {ours[name]})" for name in ours if theirs[name] != ours[name]]
    their_classes, our_classes = list(saved.get("class_names", meta["class_names"])), list(meta["class_names"])
    if not differences and their_classes != our_classes:  # as many classes, other names: other labels
        index = next(i for i, (a, b) in enumerate(zip(their_classes, our_classes, strict=True)) if a != b)
        differences.append(f"class {index} {their_classes[index]!r} (this run's data: {our_classes[index]!r})")
    if differences:
        raise CheckpointError(f"{path} is not a checkpoint of this run's model and data: {', '.join(differences)}; "
                              f"check --model and --data-dir. {RESUME_HINT}")


def _identity(model_name: str, kwargs: dict) -> dict:
    """What a resumed checkpoint must share with the run. A checkpoint from before the activation was recorded in
    model_kwargs ran its model's own (as model.load_checkpoint reads it too)."""
    identity = {"model": model_name, **{key: kwargs.get(key) for key in SAME_MODEL_KWARGS}}
    identity["activation"] = trained_activation(model_name, kwargs)
    return identity


def load_weights(state: TrainState, saved: dict, path: str, model_name: str) -> list[str]:
    """The weights and the optimizer's state, strictly; a mismatch is one CheckpointError, not torch's listing.

    The optimizer keeps this run's group settings (weight decay, betas, layer-decay lr scales: its config's, which
    config.json records); returns those that differ from the checkpoint's, as "weight_decay 0.05 -> 0.5".
    """
    this_runs = [{key: value for key, value in group.items() if key != "params"}
                 for group in state.optimizer.param_groups]
    try:
        state.unwrapped.load_state_dict(saved["model"])
    except RuntimeError as error:  # torch lists every key: the first one says enough
        detail = next((line.strip() for line in str(error).splitlines()[1:] if line.strip()), str(error))
        raise CheckpointError(f"{path}: its weights do not fit this run's {model_name} ({detail[:300]}); "
                              f"{RESUME_HINT}") from None
    try:
        state.optimizer.load_state_dict(saved["optimizer"])
    except ValueError as error:  # other parameter groups: layer-wise lr decay turned on or off
        layer_decay = saved.get("config", {}).get("layer_decay", "?")
        raise CheckpointError(f"{path}: its optimizer state does not fit this run's parameter groups ({error}); "
                              f"its run used --layer-decay {layer_decay}: pass the same") from None
    return restore_group_settings(state.optimizer, this_runs)


def restore_group_settings(optimizer, settings: list[dict]) -> list[str]:
    """Put `settings` back into the optimizer's groups after load_state_dict, which takes every saved group setting:
    --weight-decay, --beta1/2 and --layer-decay then apply as the flags say (the lr is set at every step anyway)."""
    changes: dict[str, list[tuple]] = {}
    for group, wanted in zip(optimizer.param_groups, settings, strict=True):
        for key, value in wanted.items():
            saved = group.get(key)
            if key != "lr" and _plain(saved) != _plain(value):
                changes.setdefault(key, []).append((_plain(saved), _plain(value)))
            group[key] = value
    described = []
    for key, pairs in changes.items():
        (old, new), *others = dict.fromkeys(pairs)  # the distinct changes, in group order
        described.append(f"{key} in {len(pairs)} parameter groups" if others else f"{key} {old} -> {new}")
    return described


def _plain(value):
    """Lists as tuples: a checkpoint may hold a group's betas as either."""
    return tuple(value) if isinstance(value, list) else value


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
