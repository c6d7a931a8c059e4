"""Tiny real runs on the demo data: the best-EMA checkpoint, --model-key, the stop on a non-finite loss, and
ImageNet-22K-style runs without val/."""
import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from convnext_files import sha256_file
from model.checkpoints import read_checkpoint
from training.__main__ import main
from training.config import resolve
from training.run_log import announce_batch

TINY = {"epochs": 2, "warmup_epochs": 1.0, "batch_size": 8, "max_steps_per_epoch": 2, "base_lr": 2e-3,
        "lr_ref_batch": 8, "scale_min": 0.5, "log_every": 1}


def _argv(output, preset="demo", **flags) -> list[str]:
    argv = ["--preset", preset, "--output", str(output)]
    for name, value in {**TINY, **flags}.items():
        argv += ["--" + name.replace("_", "-"), str(value)]
    return argv


def _records(output) -> list[dict]:
    return [json.loads(line) for line in (output / "log.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def ema_run(tmp_path_factory):
    """Two epochs with EMA on (decay 0.5, so the EMA weights move within a few steps)."""
    output = tmp_path_factory.mktemp("ema") / "run"
    assert main(_argv(output, ema_decay=0.5)) == 0
    return output


def test_a_run_with_ema_keeps_its_best_ema_checkpoint_and_logs_its_top1(ema_run):
    records = _records(ema_run)
    epochs = [r for r in records if "ema_val_top1" in r]
    summary = records[-1]
    assert len(epochs) == 2 and summary["event"] == "summary"
    best_epoch = max(range(2), key=lambda e: (epochs[e]["ema_val_top1"], -e))  # the first epoch at the best top-1
    assert summary["best_ema_top1"] == epochs[best_epoch]["ema_val_top1"] == epochs[-1]["best_ema_top1"]
    assert summary["best_ema_epoch"] == best_epoch
    best_ema = read_checkpoint(ema_run / "checkpoint_best_ema.pth")
    assert best_ema["epoch"] == best_epoch and best_ema["best"]["ema_top1"] == summary["best_ema_top1"]
    assert best_ema["ema_metrics"]["top1"] == summary["best_ema_top1"]
    assert (ema_run / "checkpoint_best.pth").is_file()
    start = records[0]
    assert (start["event"], start["total_batch"], start["recipe_batch"], start["peak_lr"]) == ("start", 8, 8, 2e-3)


@pytest.mark.parametrize("key", ["model", "model_ema"])
def test_finetune_model_key_picks_the_weights_it_names(ema_run, tmp_path, key):
    source = read_checkpoint(ema_run / "checkpoint_best_ema.pth")
    assert any(not torch.equal(v, source["model_ema"][k]) for k, v in source["model"].items())  # they differ
    output = tmp_path / "ft"
    argv = _argv(output, epochs=1, max_steps_per_epoch=1, base_lr=0, ema_decay=0,
                 finetune=ema_run / "checkpoint_best_ema.pth", model_key=key)
    assert main(argv) == 0
    tuned = read_checkpoint(output / "checkpoint_last.pth")["model"]
    for name, value in source[key].items():  # lr 0: exactly the weights the key named
        assert torch.equal(tuned[name], value), name


def test_model_key_model_ema_on_a_checkpoint_without_ema_is_refused_clearly(ema_run, tmp_path, capsys):
    plain = {k: v for k, v in read_checkpoint(ema_run / "checkpoint_last.pth").items() if k != "model_ema"}
    torch.save(plain, tmp_path / "plain.pth")
    argv = _argv(tmp_path / "ft", epochs=1, finetune=tmp_path / "plain.pth", model_key="model_ema")
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("python -m training: error: ") and "model_ema" in err and "Traceback" not in err


def test_a_non_finite_loss_stops_the_run_and_keeps_the_last_good_checkpoint(ema_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(ema_run, run)
    last = run / "checkpoint_last.pth"
    digest, epoch = sha256_file(last), read_checkpoint(last)["epoch"]
    # An absurd lr: after one AdamW step the weights are ~1e30 and the next forward overflows.
    assert main(_argv(run, ema_decay=0.5, epochs=4, base_lr=1e30, resume=last)) == 1
    err = capsys.readouterr().err
    assert "error: the training loss became NaN or inf" in err and "Traceback" not in err
    assert f"checkpoint_last.pth (epoch {epoch}) is the last good one" in err
    assert sha256_file(last) == digest and read_checkpoint(last)["epoch"] == epoch  # nothing saved after it
    assert not any("epoch" in r and r["epoch"] > epoch and "val_top1" in r for r in _records(run))


def test_a_run_that_diverges_before_its_first_checkpoint_names_none_not_an_earlier_runs(ema_run, tmp_path, capsys):
    """A fresh run (no --resume; --overwrite-checkpoints, else it is refused) in an --output that held an earlier
    run's checkpoint_last.pth (removed at its start)."""
    run = tmp_path / "run"
    shutil.copytree(ema_run, run)
    argv = [*_argv(run, warmup_epochs=0, base_lr=1e30), "--overwrite-checkpoints"]
    assert main(argv) == 1  # diverges at epoch 0's second step
    error = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert len(error) == 1 and "in epoch 0; nothing was saved after it: this run wrote no checkpoint yet; lower " \
        "--base-lr" in error[0]
    assert "checkpoint_last.pth" not in error[0] and not (run / "checkpoint_last.pth").exists()


def test_a_run_started_over_without_ema_leaves_no_best_ema_checkpoint_of_the_earlier_run(ema_run, tmp_path, capsys):
    """The earlier run's checkpoint_best_ema.pth beside this run's checkpoints would be served (`serve --checkpoint
    runs/X/checkpoint_best_ema.pth --ema`) as this run's EMA weights; its log.jsonl lines would precede this run's."""
    run = tmp_path / "run"
    shutil.copytree(ema_run, run)
    assert main([*_argv(run, epochs=1, max_steps_per_epoch=1, ema_decay=0), "--overwrite-checkpoints"]) == 0
    assert (f"warning: this run starts over in {run}: removed the earlier run's checkpoint_best.pth, "
            "checkpoint_best_ema.pth, checkpoint_last.pth, config.json, log.jsonl\n") in capsys.readouterr().err
    assert not (run / "checkpoint_best_ema.pth").exists()
    assert read_checkpoint(run / "checkpoint_best.pth")["step"] == 1  # this run's one step
    records = _records(run)
    assert records[0]["event"] == "start" and [r.get("event") for r in records].count("start") == 1


@pytest.fixture()
def train_only_folder(tmp_path):
    """An ImageFolder tree with train/ and no val/, like ImageNet-22K."""
    rng = np.random.default_rng(0)
    for label in ("a", "b"):
        folder = tmp_path / "data" / "train" / label
        folder.mkdir(parents=True)
        for index in range(8):
            Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(folder / f"{index}.png")
    return tmp_path / "data"


def test_in22k_trains_without_a_val_folder_and_without_evaluation(train_only_folder, tmp_path, capsys):
    output = tmp_path / "run"
    flags = dict(model="convnext_atto", data_dir=train_only_folder, input_size=32, batch_size=4, epochs=1,
                 max_steps_per_epoch=1, workers=0)
    assert main(_argv(output, preset="in22k", **flags)) == 0
    assert (output / "checkpoint_last.pth").is_file() and not (output / "checkpoint_best.pth").exists()
    assert not any("val_top1" in r for r in _records(output))
    assert "warning: total batch 4 differs from the in22k recipe's 8" in capsys.readouterr().err
    assert main(_argv(tmp_path / "with_eval", preset="in22k", **flags) + ["--no-disable-eval"]) == 2
    assert "val is missing" in capsys.readouterr().err


def test_the_lr_and_total_batch_are_printed_and_a_batch_off_the_recipe_is_warned(capsys):
    announce_batch(resolve("in1k", {"batch_size": 128, "accum_steps": 4}), world_size=8)
    out, err = capsys.readouterr()
    assert "lr 0.004 at total batch 4096 = 128 per process x 4 accumulation steps x 8 processes" in out and not err
    announce_batch(resolve("in1k", {"batch_size": 128}), world_size=1)
    out, err = capsys.readouterr()
    assert "lr 0.000125 at total batch 128" in out
    assert "warning: total batch 128 differs from the in1k recipe's 4096" in err and "--accum-steps 32" in err


def test_an_epoch_that_scores_worse_leaves_the_best_checkpoint_alone(tmp_path, monkeypatch):
    """The real run, evaluation and checkpoint writes; only the top-1 each evaluation reports is set (the model 50
    then 40, the EMA 30 then 35), since a tiny run's own scores need not fall: checkpoint_best.pth stays epoch 0's,
    checkpoint_best_ema.pth moves to epoch 1, and the summary says so."""
    import training.run

    scripted = iter([50.0, 30.0, 40.0, 35.0])  # per epoch: the model's evaluation, then the EMA's
    real_evaluate = training.run.evaluate

    def evaluate(*args, **kwargs):
        return {**real_evaluate(*args, **kwargs), "top1": next(scripted)}

    monkeypatch.setattr(training.run, "evaluate", evaluate)
    output = tmp_path / "run"
    assert main(_argv(output, ema_decay=0.5)) == 0
    summary = _records(output)[-1]
    assert (summary["best_top1"], summary["best_epoch"], summary["last_top1"]) == (50.0, 0, 40.0)
    assert (summary["best_ema_top1"], summary["best_ema_epoch"]) == (35.0, 1)
    best = read_checkpoint(output / "checkpoint_best.pth")
    best_ema = read_checkpoint(output / "checkpoint_best_ema.pth")
    assert (best["epoch"], best["metrics"]["top1"]) == (0, 50.0)
    assert (best_ema["epoch"], best_ema["ema_metrics"]["top1"]) == (1, 35.0)
    assert read_checkpoint(output / "checkpoint_last.pth")["epoch"] == 1
