"""A whole run: build model, data, optimizer and EMA from a TrainConfig; train, evaluate, checkpoint, resume."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from model import create_model, get_config, load_checkpoint

from . import checkpoint as ckpt
from .config import TrainConfig
from .data import build_datasets, build_loader, build_mixup, data_config_for, make_criterion
from .distributed import DistInfo, all_gather_objects, barrier, broadcast_buffers, process_group_from_env
from .earlier_run import refuse_an_earlier_runs_output, remove_an_earlier_runs_files
from .ema import ModelEma
from .engine import EpochSettings, NonFiniteLossError, StepPlan, TrainState, evaluate, train_one_epoch
from .optim import create_optimizer
from .resume import resume
from .run_log import RunLog, StepLines, announce_batch, progress_bar, step_lines


def model_kwargs_for(config: TrainConfig, num_classes: int) -> dict:
    """create_model's keyword arguments, every value explicit (the checkpoint records them)."""
    model_cfg = get_config(config.model)
    kwargs = {"num_classes": num_classes, "in_chans": 3, "drop_path_rate": config.drop_path,
              "activation": config.activation or model_cfg.default_activation}
    if model_cfg.family != "resnet":
        layer_scale = model_cfg.layer_scale_init if config.layer_scale_init is None else config.layer_scale_init
        kwargs.update(layer_scale_init=layer_scale, head_init_scale=config.head_init_scale)
    return kwargs


def configure_cuda_math(device: torch.device) -> None:
    """On GPUs: TF32 matmuls/convolutions and cuDNN autotuning (the official main.py sets cudnn.benchmark)."""
    if device.type != "cuda":
        return
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    torch.backends.cudnn.benchmark = True


def compile_toolchain_problem(device_type: str) -> str | None:
    """Why --compile cannot run on this device type here, or None: torch.compile builds native code at run time.

    CUDA: Triton compiles its launcher (driver.c) with the compiler Triton 3.8's runtime/build.py `_find_compiler`
    picks: $CC, else gcc or clang on PATH. CPU: Inductor compiles its C++ kernels with $CXX, else g++ (clang++ on
    macOS; torch._inductor.config.cpp.cxx). Either fails mid-run without one, after the data has loaded.
    """
    if device_type == "cuda":
        cc = os.environ.get("CC")
        if cc is not None:
            return None if shutil.which(cc) else (
                f"--compile on a GPU needs a C compiler at run time (Triton builds its CUDA launcher with $CC), and "
                f"CC={cc!r} was not found: set CC to an installed compiler or unset it, install gcc "
                "(apt-get install gcc), or drop --compile")
        if shutil.which("gcc") or shutil.which("clang"):
            return None
        return ("--compile on a GPU needs a C compiler at run time (Triton builds its CUDA launcher with $CC, else gcc "
                "or clang on PATH) and none was found: install gcc (apt-get install gcc), or drop --compile")
    if device_type == "cpu":
        cxx = os.environ.get("CXX", "clang++" if sys.platform == "darwin" else "g++")
        if shutil.which(cxx):
            return None
        return (f"--compile on the CPU needs a C++ compiler at run time (Inductor builds its kernels with $CXX, else "
                f"g++) and {cxx!r} was not found: install g++ (apt-get install g++), or drop --compile")
    return None


def build_model(config: TrainConfig, kwargs: dict, device: torch.device) -> torch.nn.Module:
    model = create_model(config.model, **kwargs)
    if config.finetune:  # official --finetune / --model_key: the head is re-initialised on a class-count mismatch
        load_checkpoint(model, config.finetune, use_ema=config.model_key == "model_ema")
    model = model.to(device)
    return model.to(memory_format=torch.channels_last) if config.channels_last else model


def _build_data(config: TrainConfig, dist_info: DistInfo, device: torch.device, augment: bool):
    """The run's evaluation DataConfig, data sets and loaders (no val loader with --disable-eval)."""
    data_cfg = data_config_for(config, get_config(config.model).data)
    datasets = build_datasets(config, data_cfg, augment=augment)

    def loader(dataset, train: bool):
        return build_loader(dataset, config.batch_size, dist_info.rank, dist_info.world_size, config.seed, train,
                            config.workers, device.type == "cuda")

    val_loader = None if datasets.val is None else loader(datasets.val, False)
    return data_cfg, datasets, loader(datasets.train, True), val_loader


@dataclass
class Run:
    """What a run builds once from its TrainConfig: the training state, the data, and what checkpoints record."""

    config: TrainConfig
    dist_info: DistInfo
    state: TrainState
    settings: EpochSettings
    train_loader: DataLoader
    val_loader: DataLoader | None  # None with --disable-eval
    mixup: object | None  # timm Mixup / CutMix, None when both are off
    criterion: torch.nn.Module
    meta: dict  # model name, kwargs, data config, class names and config: in every checkpoint
    log: RunLog
    best: dict = field(default_factory=lambda: {"top1": -1.0, "epoch": -1, "ema_top1": -1.0, "ema_epoch": -1})
    # The checkpoint_last.pth this run resumed from or last wrote, and its epoch: what a divergence falls back to.
    last_checkpoint: tuple[Path, int] | None = None


def build_run(config: TrainConfig, dist_info: DistInfo, augment: bool) -> Run:
    """Data, model, EMA, optimizer, scaler and schedule, seeded the same on every process; not yet DDP-wrapped.

    Refuses --compile first, before any data loads, where no compiler for torch.compile's kernels is installed.
    Without --resume, removes an earlier run's files from --output once the rest is built (see earlier_run).
    """
    device = torch.device(f"cuda:{dist_info.local_rank}" if torch.cuda.is_available() else "cpu")
    problem = compile_toolchain_problem(device.type) if config.compile else None
    if problem:
        raise ValueError(problem)
    configure_cuda_math(device)
    data_cfg, datasets, train_loader, val_loader = _build_data(config, dist_info, device, augment)
    num_classes = len(datasets.class_names)

    # Seeded after the data sets (building them may import libraries that draw from the global RNGs on first
    # import: scikit-learn does), and with the same seed on every process: DDP broadcasts rank 0's weights, but
    # the EMA copy is taken before that and must start from the same weights on every process too.
    ckpt.seed_everything(config.seed)
    kwargs = model_kwargs_for(config, num_classes)
    model = build_model(config, kwargs, device)
    state = TrainState(
        model=model, unwrapped=model,
        optimizer=create_optimizer(model, config.lr(dist_info.world_size), config.weight_decay,
                                   (config.beta1, config.beta2), config.layer_decay),
        plan=_step_plan(config, len(train_loader), len(datasets.train), dist_info.world_size),
        scaler=torch.amp.GradScaler(device.type) if config.amp == "fp16" else None,
        ema=ModelEma(model, config.ema_decay) if config.ema_decay > 0 else None,
    )
    mixup = build_mixup(config, num_classes)
    meta = {"model_name": config.model, "model_kwargs": kwargs, "data_config": _data_dict(data_cfg),
            "class_names": list(datasets.class_names), "config": config.to_dict()}
    settings = EpochSettings(device, config.amp, config.accum_steps, config.clip_grad, config.channels_last,
                             config.log_every, dist_info.world_size)
    ckpt.seed_everything(config.seed + dist_info.rank)  # per process from here: augmentation, Mixup/CutMix, drop path
    # Only once the data and the model are built (a mistyped --data-dir must not cost the earlier run its files), and
    # before the log opens (TensorBoard's writer creates its file at once).
    if dist_info.is_main and not config.resume:
        remove_an_earlier_runs_files(Path(config.output))
    log = RunLog(Path(config.output), dist_info.is_main)
    return Run(config, dist_info, state, settings, train_loader, val_loader, mixup, make_criterion(config, mixup),
               meta, log)


def wrap_model(run: Run) -> None:
    """Compile the (resumed) module in place with --compile, then put it in DDP with several processes.

    Compiled inside DDP, as PyTorch's "Where to apply torch.compile?" advises (Module.compile(): its state_dict keeps
    plain names): DDP marks itself the active DDP module while it calls the compiled module, so Dynamo still splits
    the graph at DDP's gradient buckets (DDPOptimizer) and the all-reduce overlaps backward. torch.compile(DDP(...))
    splits too, but breaks the graph twice in DDP's own forward.
    """
    model, dist_info = run.state.unwrapped, run.dist_info
    if run.config.compile:
        model.compile()
    if dist_info.world_size > 1:
        device = run.settings.device
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[dist_info.local_rank] if device.type == "cuda" else None)
    run.state.model = model


def run_epoch(run: Run, epoch: int, lines: StepLines | None) -> tuple[dict, list[str]]:
    """Train one epoch, evaluate, log the epoch record; returns it and the best checkpoints this epoch improved."""
    run.train_loader.sampler.set_epoch(epoch)
    plan, is_main = run.state.plan, run.dist_info.is_main
    progress = progress_bar(plan.steps_per_epoch, epoch, is_main, run.config.quiet)
    if lines is not None:
        lines.start_epoch()
    try:
        stats = train_one_epoch(run.state, run.criterion, run.train_loader, run.settings, mixup=run.mixup,
                                log=_step_logger(run.log, lines, epoch), progress=progress)
    except NonFiniteLossError as error:
        raise NonFiniteLossError(f"{error} in epoch {epoch}; nothing was saved after it: "
                                 f"{_last_good(run.last_checkpoint)}") from None
    finally:
        if progress is not None:
            progress.close()
    record = {"epoch": epoch, "step": plan.step, **stats}
    improved = evaluate_epoch(run, record)
    run.log(record)
    if is_main:
        print(json.dumps(record), file=sys.stderr, flush=True)
    return record, improved


def save_checkpoints(run: Run, record: dict, improved: list[str]) -> None:
    """The improved best checkpoints, then checkpoint_last.pth (its `best` names what they hold: a kill between the
    writes leaves the previous one, and a resume redoes the epoch and its best), from the main process; every process
    joins the RNG gather."""
    rng = all_gather_objects(ckpt.rng_state())  # every process's streams: each resumes its own
    output = Path(run.config.output)
    run.last_checkpoint = (output / "checkpoint_last.pth", record["epoch"])  # on every process: all name it
    if not run.dist_info.is_main:
        return
    state = run.state
    saved = {**run.meta, "model": state.unwrapped.state_dict(), "optimizer": state.optimizer.state_dict(),
             "scaler": state.scaler.state_dict() if state.scaler is not None else {}, "epoch": record["epoch"],
             "step": state.plan.step, "scheduler": state.plan.describe(), "rng": rng, "best": dict(run.best),
             "metrics": _prefixed(record, "val_"), "ema_metrics": _prefixed(record, "ema_val_"),
             **({"model_ema": state.ema.state_dict()} if state.ema is not None else {})}
    for name in [*improved, "checkpoint_last.pth"]:
        ckpt.save_atomic(saved, output / name)


def train(config: TrainConfig, dist_info: DistInfo | None = None, *, augment: bool = True,
          stop_after_epoch: int | None = None) -> dict:
    """Run `config` to the end (or through epoch `stop_after_epoch`, to simulate a kill).

    Returns the run's summary (plain data, as logged: epochs done, wall time, best and last top-1); the weights
    are in the checkpoints. Without `dist_info`, the run joins torchrun's process group (WORLD_SIZE > 1) and
    destroys it when it ends or fails; with one, the caller owns the process group.
    """
    refuse_an_earlier_runs_output(config)
    group = contextlib.nullcontext(dist_info) if dist_info is not None else process_group_from_env()
    with group as dist_info:
        return _train(config, dist_info, augment, stop_after_epoch)


def _train(config: TrainConfig, dist_info: DistInfo, augment: bool, stop_after_epoch: int | None) -> dict:
    run = build_run(config, dist_info, augment)
    start_epoch = 0
    if config.resume:
        resumed_epoch, best = resume(config.resume, run.state, run.meta, dist_info, config.seed)
        run.best.update(best)
        run.last_checkpoint = (Path(config.resume), resumed_epoch)
        start_epoch = resumed_epoch + 1
    if start_epoch >= config.epochs:  # a finished run resumed again (a requeued job): nothing to do, not an error
        if dist_info.is_main:
            print(f"warning: nothing to train: {config.resume} has {start_epoch} epoch(s) done and --epochs is "
                  f"{config.epochs}; raise --epochs to train on", file=sys.stderr, flush=True)
        return {}
    wrap_model(run)
    plan = run.state.plan
    if dist_info.is_main:
        _announce_start(config, dist_info.world_size, plan, run.meta, run.log)

    run_started = time.perf_counter()
    last_epoch = config.epochs - 1 if stop_after_epoch is None else min(stop_after_epoch, config.epochs - 1)
    summary: dict = {}
    lines = step_lines(plan.steps_per_epoch, last_epoch, dist_info.is_main, config.quiet)
    for epoch in range(start_epoch, last_epoch + 1):
        record, improved = run_epoch(run, epoch, lines)
        save_checkpoints(run, record, improved)
        barrier()
        if lines is not None:
            lines.finish_epoch()
        with_ema = run.state.ema is not None and run.val_loader is not None
        summary = {"event": "summary", "epochs_done": epoch + 1, "wall_s": round(time.perf_counter() - run_started, 1),
                   **_best_summary(run.best, record, with_ema)}
    if summary:
        run.log(summary)
        if dist_info.is_main:
            print("training done: " + json.dumps(summary), flush=True)
    return summary


def _step_logger(log: RunLog, lines: StepLines | None, epoch: int):
    """What train_one_epoch calls on each logging step: the record to log.jsonl, and a progress line."""

    def log_step(record: dict) -> None:
        record = {"epoch": epoch, **record}
        log(record)
        if lines is not None:
            lines(record)

    return log_step


def _announce_start(config: TrainConfig, world_size: int, plan: StepPlan, meta: dict, log: RunLog) -> None:
    output = Path(config.output)
    output.mkdir(parents=True, exist_ok=True)
    (output / "config.json").write_text(json.dumps(config.to_dict(), indent=2) + "\n")
    stale = ckpt.remove_interrupted_writes(output)
    if stale:
        print(f"warning: removed {len(stale)} temporary file(s) of interrupted checkpoint saves from {output}: "
              f"{', '.join(path.name for path in stale)}", file=sys.stderr, flush=True)
    log({"event": "start", "world_size": world_size, "total_batch": config.total_batch(world_size),
         "recipe_batch": config.lr_ref_batch, "peak_lr": plan.peak_lr, "steps_per_epoch": plan.steps_per_epoch,
         **meta})
    announce_batch(config, world_size)


def _step_plan(config: TrainConfig, num_batches: int, num_images: int, world_size: int) -> StepPlan:
    batches = num_batches - num_batches % config.accum_steps
    steps_per_epoch = batches // config.accum_steps
    if config.max_steps_per_epoch:
        steps_per_epoch = min(steps_per_epoch, config.max_steps_per_epoch)
    if steps_per_epoch < 1:
        raise ValueError(f"{num_images} training images give no full optimizer step at batch "
                         f"{config.batch_size} x accum {config.accum_steps} x {world_size} processes")
    return StepPlan(config.lr(world_size), config.min_lr, round(config.warmup_epochs * steps_per_epoch),
                    config.epochs * steps_per_epoch, steps_per_epoch=steps_per_epoch)


def evaluate_epoch(run: Run, record: dict) -> list[str]:
    """Evaluate the model (and the EMA), update `run.best` and `record`; the best checkpoints this epoch improved.

    Both the same way: precision, and the memory format the weights are in (channels_last inputs for channels_last
    weights, or every convolution converts them).
    """
    if run.val_loader is None:  # --disable-eval (ImageNet-22K): no metrics, no best checkpoints
        return []
    epoch, improved, best, settings, val_loader = record["epoch"], [], run.best, run.settings, run.val_loader

    def measure(module: torch.nn.Module) -> dict:
        broadcast_buffers(module)  # the same collectives on every process, whatever its shard
        return evaluate(module, val_loader, settings.device, amp=settings.amp, channels_last=settings.channels_last)

    # The module under DDP (compiled with --compile): evaluation syncs no gradients, and DDP's forward may broadcast
    # buffers, a collective that evaluation shards of unequal length (a batch more on some ranks) would leave unmatched.
    metrics = measure(run.state.unwrapped)
    record.update({f"val_{k}": v for k, v in metrics.items()})
    if metrics["top1"] > best["top1"]:
        best.update(top1=metrics["top1"], epoch=epoch)
        improved.append("checkpoint_best.pth")
    record["best_top1"] = best["top1"]
    if run.state.ema is not None:  # official --model_ema_eval: the EMA weights evaluated and their best kept apart
        ema_metrics = measure(run.state.ema.module)
        record.update({f"ema_val_{k}": v for k, v in ema_metrics.items()})
        if ema_metrics["top1"] > best["ema_top1"]:
            best.update(ema_top1=ema_metrics["top1"], ema_epoch=epoch)
            improved.append("checkpoint_best_ema.pth")
        record["best_ema_top1"] = best["ema_top1"]
    return improved


def _prefixed(record: dict, prefix: str) -> dict:
    """{"top1": ..., "loss": ...} from a record's `val_top1`, `val_loss` ... ({} when not evaluated)."""
    return {k[len(prefix):]: v for k, v in record.items() if k.startswith(prefix)}


def _best_summary(best: dict, record: dict, with_ema: bool) -> dict:
    if "val_top1" not in record:
        return {}
    summary = {"best_top1": best["top1"], "best_epoch": best["epoch"], "last_top1": record["val_top1"]}
    if with_ema:
        summary.update(best_ema_top1=best["ema_top1"], best_ema_epoch=best["ema_epoch"])
    return summary


def _last_good(last_checkpoint: tuple[Path, int] | None) -> str:
    """Names the checkpoint this run resumed from or wrote last: a checkpoint_last.pth an earlier run left in
    --output is not this run's."""
    if last_checkpoint is None:
        return "this run wrote no checkpoint yet; lower --base-lr or try --clip-grad / --amp bf16"
    path, epoch = last_checkpoint
    return (f"{path} (epoch {epoch}) is the last good one; --resume it with a lower --base-lr, or --clip-grad / "
            "--amp bf16")


def _data_dict(data_cfg) -> dict:
    return {"input_size": data_cfg.input_size, "crop_pct": data_cfg.crop_pct, "crop_mode": data_cfg.crop_mode,
            "interpolation": data_cfg.interpolation, "mean": list(data_cfg.mean), "std": list(data_cfg.std)}
