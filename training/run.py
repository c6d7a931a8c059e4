"""A whole run: build model, data, optimizer and EMA from a TrainConfig; train, evaluate, checkpoint, resume."""
from __future__ import annotations

import json
import math
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch

from model import create_model, get_config

from . import checkpoint as ckpt
from .config import TrainConfig
from .data import build_datasets, build_loader, build_mixup, data_config_for, make_criterion
from .distributed import DistInfo, barrier, init_from_env
from .ema import ModelEma
from .engine import StepPlan, evaluate, train_one_epoch
from .optim import create_optimizer


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


def model_kwargs_for(config: TrainConfig, num_classes: int) -> dict:
    kwargs = {"num_classes": num_classes, "in_chans": 3}
    if get_config(config.model).family != "resnet":
        kwargs.update(drop_path_rate=config.drop_path, layer_scale_init=config.layer_scale_init,
                      head_init_scale=config.head_init_scale)
    return kwargs


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def train(config: TrainConfig, dist_info: DistInfo | None = None, *, augment: bool = True,
          stop_after_epoch: int | None = None) -> dict:
    """Run `config` to the end (or through epoch `stop_after_epoch`, to simulate a kill); returns the summary."""
    dist_info = dist_info or init_from_env()
    device = torch.device(f"cuda:{dist_info.local_rank}" if torch.cuda.is_available() else "cpu")
    seed_everything(config.seed + dist_info.rank)
    output = Path(config.output)
    log = RunLog(output, dist_info.is_main)

    data_cfg = data_config_for(config, get_config(config.model).data)
    datasets = build_datasets(config, data_cfg, augment=augment)
    num_classes = len(datasets.class_names)
    pin = device.type == "cuda"
    train_loader = build_loader(datasets.train, config.batch_size, dist_info.rank, dist_info.world_size,
                                config.seed, True, config.workers, pin)
    val_loader = build_loader(datasets.val, config.batch_size, dist_info.rank, dist_info.world_size,
                              config.seed, False, config.workers, pin)

    kwargs = model_kwargs_for(config, num_classes)
    model = create_model(config.model, **kwargs, checkpoint=config.finetune or None).to(device)
    if config.channels_last:
        model = model.to(memory_format=torch.channels_last)
    unwrapped = model
    ema = ModelEma(unwrapped, config.ema_decay) if config.ema_decay > 0 else None
    optimizer = create_optimizer(unwrapped, config.lr(dist_info.world_size), config.weight_decay,
                                 (config.beta1, config.beta2), config.layer_decay)
    scaler = torch.amp.GradScaler(device.type) if config.amp == "fp16" else None

    batches = len(train_loader) - len(train_loader) % config.accum_steps
    steps_per_epoch = batches // config.accum_steps
    if config.max_steps_per_epoch:
        steps_per_epoch = min(steps_per_epoch, config.max_steps_per_epoch)
    if steps_per_epoch < 1:
        raise ValueError(f"{len(datasets.train)} training images give no full optimizer step at batch "
                         f"{config.batch_size} x accum {config.accum_steps} x {dist_info.world_size} processes")
    plan = StepPlan(config.lr(dist_info.world_size), config.min_lr,
                    round(config.warmup_epochs * steps_per_epoch), config.epochs * steps_per_epoch)
    start_epoch, best = 0, {"top1": -1.0, "epoch": -1}
    if config.resume:
        state = ckpt.load(config.resume)
        unwrapped.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if ema is not None:
            ema.load_state_dict(state["model_ema"])
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        plan.step, start_epoch, best = state["step"], state["epoch"] + 1, dict(state["best"])
        if dist_info.rank < len(state["rng"]):
            ckpt.set_rng_state(state["rng"][dist_info.rank] if isinstance(state["rng"], list) else state["rng"])

    if config.compile:
        model = torch.compile(model)
    if dist_info.world_size > 1:
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[dist_info.local_rank] if device.type == "cuda" else None)
    mixup = build_mixup(config, num_classes)
    criterion = make_criterion(config, mixup)
    meta = {"model_name": config.model, "model_kwargs": kwargs, "data_config": _data_dict(data_cfg),
            "class_names": list(datasets.class_names), "config": config.to_dict()}
    if dist_info.is_main:
        output.mkdir(parents=True, exist_ok=True)
        (output / "config.json").write_text(json.dumps(config.to_dict(), indent=2) + "\n")
        log({"event": "start", "world_size": dist_info.world_size, "total_batch":
             config.total_batch(dist_info.world_size), "peak_lr": plan.peak_lr, "steps_per_epoch": steps_per_epoch,
             **meta})

    run_started = time.perf_counter()
    last_epoch = config.epochs - 1 if stop_after_epoch is None else min(stop_after_epoch, config.epochs - 1)
    summary: dict = {}
    for epoch in range(start_epoch, last_epoch + 1):
        train_loader.sampler.set_epoch(epoch)
        progress = _progress(steps_per_epoch, epoch, dist_info.is_main)
        stats = train_one_epoch(
            model, criterion, train_loader, optimizer, plan, device, scaler=scaler, mixup=mixup, ema=ema,
            unwrapped=unwrapped, amp=config.amp, accum_steps=config.accum_steps, clip_grad=config.clip_grad,
            channels_last=config.channels_last, max_steps=steps_per_epoch,
            log=(lambda r, e=epoch: log({"epoch": e, **r})), log_every=config.log_every, progress=progress)
        if progress is not None:
            progress.close()
        metrics = evaluate(model, val_loader, device, amp=config.amp, channels_last=config.channels_last)
        record = {"epoch": epoch, "step": plan.step, **stats, **{f"val_{k}": v for k, v in metrics.items()}}
        if ema is not None:
            ema_metrics = evaluate(ema.module, val_loader, device, amp=config.amp)
            record.update({f"ema_val_{k}": v for k, v in ema_metrics.items()})
        is_best = metrics["top1"] > best["top1"]
        if is_best:
            best = {"top1": metrics["top1"], "epoch": epoch}
        record["best_top1"] = best["top1"]
        log(record)
        if dist_info.is_main:
            print(json.dumps(record), file=sys.stderr, flush=True)
            state = {**meta, "model": unwrapped.state_dict(), "optimizer": optimizer.state_dict(),
                     "scaler": scaler.state_dict() if scaler is not None else {}, "epoch": epoch, "step": plan.step,
                     "scheduler": {"peak_lr": plan.peak_lr, "min_lr": plan.min_lr, "warmup_steps":
                                   plan.warmup_steps, "total_steps": plan.total_steps, "step": plan.step},
                     "rng": ckpt.rng_state(), "best": best, "metrics": metrics}
            if ema is not None:
                state["model_ema"] = ema.state_dict()
            ckpt.save_atomic(state, output / "checkpoint_last.pth")
            if is_best:
                ckpt.save_atomic(state, output / "checkpoint_best.pth")
        barrier()
        summary = {"event": "summary", "epochs_done": epoch + 1, "best_top1": best["top1"], "best_epoch":
                   best["epoch"], "last_top1": metrics["top1"], "wall_s": round(time.perf_counter() - run_started, 1)}
    if summary:
        log(summary)
        if dist_info.is_main:
            print("training done: " + json.dumps(summary), flush=True)
    return {**summary, "model": unwrapped, "optimizer": optimizer, "ema": ema}


def _data_dict(data_cfg) -> dict:
    return {"input_size": data_cfg.input_size, "crop_pct": data_cfg.crop_pct, "interpolation":
            data_cfg.interpolation, "mean": list(data_cfg.mean), "std": list(data_cfg.std)}


def _progress(total: int, epoch: int, is_main: bool):
    if not (is_main and sys.stderr.isatty()):
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=f"epoch {epoch}", leave=False)
