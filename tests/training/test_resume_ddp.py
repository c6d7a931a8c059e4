"""Exact resume after a stop, and a 2-process DDP (gloo, CPU) run equal to a 1-process run at the same batch."""
import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from ddp_env import free_port, join_as_torchrun

from model.checkpoints import read_checkpoint
from training.config import PRESETS
from training.distributed import DistInfo, process_group_from_env
from training.optim import lr_at_step
from training.run import train

ROOT = Path(__file__).resolve().parents[2]

TINY = dataclasses.replace(
    PRESETS["demo"], epochs=3, warmup_epochs=1.0, batch_size=8, max_steps_per_epoch=2, ema_decay=0.9,
    base_lr=1e-3, lr_ref_batch=8, scale_min=0.5,
)


def _assert_states_equal(a: dict, b: dict, atol: float):
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=atol, rtol=0, msg=key)


def _full_and_resumed_runs(root: str, workers: int) -> None:
    """An uninterrupted run in root/full; in root/split a run stopped after epoch 0's checkpoint, then resumed."""
    config = dataclasses.replace(TINY, workers=workers)
    train(dataclasses.replace(config, output=f"{root}/full"), DistInfo())
    first = dataclasses.replace(config, output=f"{root}/split")
    train(first, DistInfo(), stop_after_epoch=0)  # "killed" after epoch 0's checkpoint
    assert read_checkpoint(f"{root}/split/checkpoint_last.pth")["epoch"] == 0
    train(dataclasses.replace(first, resume=f"{root}/split/checkpoint_last.pth"), DistInfo())


@pytest.mark.parametrize("workers", [0, 2], ids=["in-process", "2-workers"])
def test_stop_and_resume_equals_an_uninterrupted_run(tmp_path, workers):
    """With data-loader workers too: their augmentation draws (crops, flips) continue exactly after a resume."""
    if workers:  # in a fresh interpreter: the workers fork from it, not from this one and earlier tests' threads
        # this folder on sys.path, as pytest puts it: the module imports ddp_env.py beside it
        script = (f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); "
                  f"from test_resume_ddp import _full_and_resumed_runs as runs; runs({str(tmp_path)!r}, {workers})")
        subprocess.run([sys.executable, "-c", script], cwd=ROOT, check=True, timeout=300, capture_output=True)
    else:
        _full_and_resumed_runs(str(tmp_path), workers)
    a, b = (read_checkpoint(tmp_path / d / "checkpoint_last.pth") for d in ("full", "split"))  # the final states
    _assert_states_equal(a["model"], b["model"], 1e-6)
    _assert_states_equal(a["model_ema"], b["model_ema"], 1e-6)
    full_opt, resumed_opt = a["optimizer"], b["optimizer"]
    for index, state in full_opt["state"].items():
        _assert_states_equal(state, resumed_opt["state"][index], 1e-6)
    assert (a["step"], a["epoch"]) == (b["step"], b["epoch"]) == (6, 2)


def test_a_resume_with_ema_turned_on_starts_the_ema_from_the_checkpoints_weights(tmp_path, capsys):
    """The checkpoint's run had no EMA: the resumed one starts its EMA from the weights (as the official
    auto_load_model) and says so, instead of failing on the missing model_ema."""
    first = dataclasses.replace(TINY, ema_decay=0.0, output=str(tmp_path / "run"))
    train(first, DistInfo(), stop_after_epoch=0)
    last = tmp_path / "run" / "checkpoint_last.pth"
    assert "model_ema" not in read_checkpoint(last)
    train(dataclasses.replace(first, ema_decay=0.9, resume=str(last)), DistInfo())
    assert "has no EMA weights (its run had no EMA); the EMA starts from its weights" in capsys.readouterr().err
    assert read_checkpoint(last)["model_ema"].keys() == read_checkpoint(last)["model"].keys()


def test_a_resume_with_fewer_steps_per_epoch_continues_the_schedule_at_the_epochs_start_in_the_new_plan(
        tmp_path, capsys):
    """Saved after epoch 0 at 2 steps per epoch, resumed at 1: epoch 1 is step 1 of the new 2-step plan (the peak lr
    after its 1-step warmup), not the saved step 2 (its end, min_lr)."""
    first = dataclasses.replace(TINY, epochs=2, ema_decay=0.0, log_every=1, output=str(tmp_path / "run"))
    train(first, DistInfo(), stop_after_epoch=0)
    last = tmp_path / "run" / "checkpoint_last.pth"
    assert (read_checkpoint(last)["epoch"], read_checkpoint(last)["step"]) == (0, 2)
    train(dataclasses.replace(first, max_steps_per_epoch=1, resume=str(last)), DistInfo())
    records = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    resumed_steps = [(r["step"], r["lr"]) for r in records if r.get("epoch") == 1 and "epoch_step" in r]
    peak_lr = first.lr(world_size=1)
    expected_lr = lr_at_step(1, peak_lr, warmup_steps=1, total_steps=2, min_lr=first.min_lr)  # epoch 1 of 1-step epochs
    assert expected_lr == pytest.approx(peak_lr)
    assert resumed_steps == [(2, pytest.approx(expected_lr))]  # a step's record comes after it: step 1 -> 2
    assert (read_checkpoint(last)["epoch"], read_checkpoint(last)["step"]) == (1, 2)
    assert "took 2 optimizer steps through epoch 0, this run takes 1 per epoch" in capsys.readouterr().err


def _ddp_worker(rank: int, world_size: int, port: int, config):
    join_as_torchrun(rank, world_size, port)
    train(config, augment=False)  # joins the group from the environment, destroys it at the end


@pytest.mark.timeout(180)
def test_two_process_ddp_matches_one_process_at_the_same_global_batch(tmp_path):
    base = dataclasses.replace(TINY, epochs=1, ema_decay=0.0, label_smoothing=0.0)
    train(dataclasses.replace(base, output=str(tmp_path / "one")), DistInfo(), augment=False)
    single = read_checkpoint(tmp_path / "one" / "checkpoint_last.pth")
    ddp = dataclasses.replace(base, batch_size=base.batch_size // 2, output=str(tmp_path / "two"))
    mp.spawn(_ddp_worker, args=(2, free_port(), ddp), nprocs=2, join=True)
    distributed = read_checkpoint(tmp_path / "two" / "checkpoint_last.pth")
    assert distributed["step"] == 2
    _assert_states_equal(single["model"], distributed["model"], 1e-5)


# Every source of per-process randomness on: crop augmentation, Mixup/CutMix (NumPy), drop path (torch), EMA.
RANDOM = dataclasses.replace(TINY, batch_size=4, mixup=0.8, cutmix=1.0, drop_path=0.1, scale_min=0.3, epochs=3)


def _ddp_resume_worker(rank: int, world_size: int, port: int, full, first, resumed):
    join_as_torchrun(rank, world_size, port)
    with process_group_from_env() as dist_info:  # one group for the three runs: each is given it, none ends it
        train(full, dist_info)
        train(first, dist_info, stop_after_epoch=0)  # "killed" after epoch 0's checkpoint
        train(resumed, dist_info)


@pytest.mark.timeout(240)
def test_two_process_resume_restores_each_ranks_rng_and_equals_an_uninterrupted_run(tmp_path):
    full = dataclasses.replace(RANDOM, output=str(tmp_path / "full"))
    first = dataclasses.replace(RANDOM, output=str(tmp_path / "split"))
    resumed = dataclasses.replace(first, resume=str(tmp_path / "split" / "checkpoint_last.pth"))
    mp.spawn(_ddp_resume_worker, args=(2, free_port(), full, first, resumed), nprocs=2, join=True)
    a, b = (read_checkpoint(tmp_path / d / "checkpoint_last.pth") for d in ("full", "split"))
    assert (a["epoch"], a["step"]) == (b["epoch"], b["step"]) == (2, 6)
    # Each rank resumed its own streams: the ranks still differ after the resume...
    assert len(b["rng"]) == 2 and not torch.equal(b["rng"][0]["torch"], b["rng"][1]["torch"])
    for rank in (0, 1):  # ...and each rank's streams end exactly where the uninterrupted run's do
        assert torch.equal(a["rng"][rank]["torch"], b["rng"][rank]["torch"])
        assert torch.equal(a["rng"][rank]["numpy"][1], b["rng"][rank]["numpy"][1])
        assert a["rng"][rank]["python"] == b["rng"][rank]["python"]
    for part in ("model", "model_ema"):
        for key, value in a[part].items():
            assert torch.equal(value, b[part][key]), f"{part}.{key}"
    for index, state in a["optimizer"]["state"].items():
        for key, value in state.items():
            assert torch.equal(value, b["optimizer"]["state"][index][key]), f"optimizer {index}.{key}"
    assert a["metrics"] == b["metrics"] and a["ema_metrics"] == b["ema_metrics"]
