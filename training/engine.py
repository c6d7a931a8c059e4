"""One training epoch and one evaluation pass; a reader follows an epoch top to bottom here."""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass

import torch
from torch import nn

from .distributed import all_reduce_sum
from .ema import ModelEma
from .optim import lr_at_step, peak_lr, set_lr


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or inf (the official engine stops too); nothing is saved after it."""


@dataclass
class StepPlan:
    """Where the per-iteration schedule stands: optimizer steps done so far and in total."""

    peak_lr: float
    min_lr: float
    warmup_steps: int
    total_steps: int
    step: int = 0
    steps_per_epoch: int = 0

    def describe(self) -> dict:
        return {"peak_lr": self.peak_lr, "min_lr": self.min_lr, "warmup_steps": self.warmup_steps,
                "total_steps": self.total_steps, "step": self.step}


@dataclass(frozen=True)
class EpochSettings:
    """What every epoch of a run does the same way: the device, precision, accumulation, clipping, logging."""

    device: torch.device
    amp: str = "off"  # "off", "bf16" or "fp16" (autocast dtype; fp16 also needs the state's GradScaler)
    accum_steps: int = 1  # micro-batches per optimizer step
    clip_grad: float = 0.0  # max gradient norm; 0: no clipping
    channels_last: bool = False
    log_every: int = 20  # optimizer steps between log records (and the non-finite check: both need a host sync)
    world_size: int = 1  # processes training together: the logged images/s counts all of their images


@dataclass
class TrainState:
    """The live objects an epoch updates, beside the StepPlan that says where the schedule stands."""

    model: nn.Module  # what trains: `unwrapped`, in DDP when there are several processes
    unwrapped: nn.Module  # the module under DDP: what evaluation runs, the EMA follows and checkpoints hold
    optimizer: torch.optim.Optimizer
    plan: StepPlan
    scaler: torch.amp.GradScaler | None = None  # only with amp="fp16"
    ema: ModelEma | None = None


def autocast(device: torch.device, amp: str):
    if amp == "off":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if amp == "bf16" else torch.float16)


def train_one_epoch(state: TrainState, criterion, loader, settings: EpochSettings, *, mixup=None, log=None,
                    progress=None) -> dict:
    """Gradient accumulation over `accum_steps` batches per optimizer step; lr set per optimizer step.

    Stops after `plan.steps_per_epoch` optimizer steps when that is set. Raises NonFiniteLossError at the first
    logging step (and at the end) after a NaN / inf loss on any process.
    """
    model, plan, device, accum_steps = state.model, state.plan, settings.device, settings.accum_steps
    model.train()
    loss_sum = torch.zeros((), device=device)
    nonfinite = torch.zeros((), device=device)  # count of non-finite micro-batch losses, kept on the device
    checked_step = plan.step
    samples, started, steps_done = 0, time.perf_counter(), 0
    num_batches = len(loader) - len(loader) % accum_steps
    if plan.steps_per_epoch:
        num_batches = min(num_batches, plan.steps_per_epoch * accum_steps)
    for index, (images, targets) in enumerate(loader):
        if index >= num_batches:
            break
        images = images.to(device, non_blocking=True)
        targets = targets.to(device, non_blocking=True)
        if settings.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        if mixup is not None:
            images, targets = mixup(images, targets)
        last_micro = (index + 1) % accum_steps == 0
        # DDP: all-reduce gradients only on the micro-batch that ends an accumulation.
        sync = model.no_sync() if hasattr(model, "no_sync") and not last_micro else contextlib.nullcontext()
        with sync, autocast(device, settings.amp):
            loss = criterion(model(images), targets)
        scaled = loss / accum_steps
        (state.scaler.scale(scaled) if state.scaler is not None else scaled).backward()
        loss_sum += loss.detach() * images.shape[0]
        nonfinite += (~torch.isfinite(loss.detach())).float()
        samples += images.shape[0]
        if not last_micro:
            continue
        _optimizer_step(state, settings.clip_grad)
        if state.ema is not None:
            state.ema.update(state.unwrapped)
        plan.step += 1
        steps_done += 1
        if progress is not None:
            progress.update(1)
        if steps_done % settings.log_every == 0:
            # .item() syncs the device: only on logging steps; the non-finite check rides on the same sync.
            _stop_if_nonfinite(nonfinite, checked_step, plan.step)
            checked_step = plan.step
            if log is not None:  # every process runs as many batches of this size (DistributedSampler, drop_last)
                log({"step": plan.step, "epoch_step": steps_done, "loss": loss.item(),
                     "lr": peak_lr(state.optimizer),
                     "images_per_s": samples * settings.world_size / (time.perf_counter() - started)})
    _stop_if_nonfinite(nonfinite, checked_step, plan.step)
    elapsed = time.perf_counter() - started
    totals = all_reduce_sum(torch.stack([loss_sum.float(), torch.tensor(float(samples), device=device)]))
    return {"train_loss": (totals[0] / totals[1].clamp(min=1)).item(),
            "train_images_per_s": totals[1].item() / elapsed,  # every process's images
            "steps": steps_done}


def _optimizer_step(state: TrainState, clip_grad: float) -> None:
    """Set this step's lr (per iteration, layer-decay scales applied), unscale and clip if asked, step, zero grads."""
    plan, optimizer, scaler = state.plan, state.optimizer, state.scaler
    set_lr(optimizer, lr_at_step(plan.step, plan.peak_lr, plan.warmup_steps, plan.total_steps, plan.min_lr))
    if scaler is not None:
        scaler.unscale_(optimizer)
    if clip_grad > 0:
        nn.utils.clip_grad_norm_(state.model.parameters(), clip_grad)
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def _stop_if_nonfinite(nonfinite: torch.Tensor, from_step: int, to_step: int) -> None:
    """Summed over every process, so all of them stop at the same step (none is left waiting in a collective)."""
    if all_reduce_sum(nonfinite.clone()).item() > 0:
        raise NonFiniteLossError(f"the training loss became NaN or inf between optimizer steps {from_step} and "
                                 f"{to_step}; training stopped")


@torch.no_grad()
def evaluate(model, loader, device, *, amp="off", channels_last=False) -> dict:
    """Top-1 / top-5 accuracy (%) and cross-entropy, summed over every process."""
    model.eval()
    criterion = nn.CrossEntropyLoss(reduction="sum")
    totals = torch.zeros(4, device=device, dtype=torch.float64)  # loss, top1, top5, count
    for images, targets in loader:
        images, targets = images.to(device, non_blocking=True), targets.to(device, non_blocking=True)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with autocast(device, amp):
            logits = model(images).float()
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices
        hits = top.eq(targets[:, None])
        totals += torch.stack([criterion(logits, targets).double(), hits[:, :1].sum().double(),
                               hits.sum().double(), torch.tensor(float(len(targets)), device=device).double()])
    totals = all_reduce_sum(totals)
    count = totals[3].clamp(min=1)
    return {"loss": (totals[0] / count).item(), "top1": (100 * totals[1] / count).item(),
            "top5": (100 * totals[2] / count).item(), "count": int(totals[3].item())}
