"""2-process gloo runs: evaluation counts each validation image once; a run ends (or fails) with its process group
destroyed."""
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from ddp_env import free_port, join_as_torchrun
from PIL import Image

from model import create_model, get_config
from model.checkpoints import read_checkpoint
from training.config import PRESETS
from training.data import build_datasets, build_loader, data_config_for, eval_shard
from training.distributed import broadcast_buffers
from training.engine import evaluate
from training.run import train

ROOT = Path(__file__).resolve().parents[2]
VAL_IMAGES = {"dark": 4, "light": 3}  # 7: not divisible by the 2 processes


def _image_folder(root: Path) -> Path:
    """train/ and val/ of two classes (dark and light noise, 32 px PNGs); 7 validation images."""
    rng = np.random.default_rng(0)
    for split, counts in (("train", {"dark": 4, "light": 4}), ("val", VAL_IMAGES)):
        for label, count in counts.items():
            folder = root / split / label
            folder.mkdir(parents=True)
            for index in range(count):
                low = 0 if label == "dark" else 100
                pixels = rng.integers(low, low + 156, size=(32, 32, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{index}.png")
    return root


def _config(data_dir: Path, output: Path):
    # batch 2 per process: the shards (4 and 3 images) end in a full and a short batch
    return dataclasses.replace(
        PRESETS["demo"], data_dir=str(data_dir), output=str(output), epochs=1, warmup_epochs=0.0, batch_size=2,
        max_steps_per_epoch=1, ema_decay=0.9, base_lr=1e-3, lr_ref_batch=4, quiet=True)


def _run_worker(rank: int, world_size: int, port: int, config, report_dir: str):
    """Train as `python -m training` under torchrun does (the run joins the group itself); report what is left."""
    join_as_torchrun(rank, world_size, port)
    error = ""
    try:
        train(config)
    except FileNotFoundError as exc:  # the failing run's missing --data-dir
        error = str(exc)
    report = {"error": error, "group_left_initialized": torch.distributed.is_initialized()}
    Path(report_dir, f"rank{rank}.json").write_text(json.dumps(report))


def _spawn_run(config, report_dir: Path) -> list[dict]:
    report_dir.mkdir()
    mp.spawn(_run_worker, args=(2, free_port(), config, str(report_dir)), nprocs=2, join=True)
    return [json.loads((report_dir / f"rank{rank}.json").read_text()) for rank in range(2)]


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory):
    """One 2-process run on 7 validation images: its output folder, config and what each rank reported."""
    root = tmp_path_factory.mktemp("ddp-eval")
    config = _config(_image_folder(root / "data"), root / "run")
    return config, _spawn_run(config, root / "reports")


def _single_process_metrics(config, weights: dict) -> dict:
    """The saved weights evaluated by one process over the whole val/ folder."""
    model = create_model(config.model, **read_checkpoint(Path(config.output) / "checkpoint_last.pth")["model_kwargs"])
    model.load_state_dict(weights)
    datasets = build_datasets(config, data_config_for(config, get_config(config.model).data))
    loader = build_loader(datasets.val, config.batch_size, 0, 1, config.seed, False, 0, False)
    return evaluate(model, loader, torch.device("cpu"))


@pytest.mark.timeout(240)
def test_two_process_evaluation_counts_each_image_once_and_matches_one_process(two_process_run):
    config, reports = two_process_run
    assert [r["error"] for r in reports] == ["", ""]
    saved = read_checkpoint(Path(config.output) / "checkpoint_last.pth")
    for metrics, weights in ((saved["metrics"], saved["model"]), (saved["ema_metrics"], saved["model_ema"])):
        # DistributedSampler padded rank 1's shard with a repeat of image 0: 8 images, and a top-1 over them
        assert metrics["count"] == sum(VAL_IMAGES.values()) == 7
        single = _single_process_metrics(config, weights)
        assert single["count"] == 7
        assert metrics["top1"] == pytest.approx(single["top1"], abs=1e-9)
        assert metrics["top5"] == pytest.approx(single["top5"], abs=1e-9)
        assert metrics["loss"] == pytest.approx(single["loss"], rel=1e-5)


def test_evaluation_shards_cover_every_image_exactly_once():
    images = list(range(7))
    for world_size in (1, 2, 3, 8):
        shards = [list(eval_shard(images, rank, world_size)) for rank in range(world_size)]
        assert sorted(i for shard in shards for i in shard) == images
        assert max(map(len, shards)) - min(map(len, shards)) <= 1


@pytest.mark.timeout(240)
def test_a_run_that_joined_the_process_group_destroys_it_at_the_end(two_process_run):
    _, reports = two_process_run
    assert [r["group_left_initialized"] for r in reports] == [False, False]


@pytest.mark.timeout(120)
def test_a_run_that_fails_destroys_its_process_group_too(tmp_path):
    config = _config(tmp_path / "missing", tmp_path / "run")  # no train/ or val/: both ranks fail in build_run
    reports = _spawn_run(config, tmp_path / "reports")
    assert all("train/ and val/ class folders" in r["error"] for r in reports)
    assert [r["group_left_initialized"] for r in reports] == [False, False]


@pytest.mark.timeout(240)
def test_torchrun_two_process_cli_run_exits_cleanly_without_a_process_group_warning(tmp_path):
    """`torchrun -m training` as the README runs it, on gloo. PyTorch's exit warning ("destroy_process_group() was
    not called before program exit") comes from NCCL's destructor, so gloo never printed it, even before the run
    destroyed its group; the in-process tests above are the ones that see the group left behind."""
    data = _image_folder(tmp_path / "data")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(free_port()),
         "-m", "training", "--preset", "demo", "--data-dir", str(data), "--epochs", "1", "--warmup-epochs", "0",
         "--max-steps-per-epoch", "1", "--batch-size", "2", "--quiet", "--output", str(tmp_path / "run")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=200)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "destroy_process_group" not in result.stderr
    assert read_checkpoint(tmp_path / "run" / "checkpoint_last.pth")["metrics"]["count"] == 7


def _buffers_worker(rank: int, world_size: int, port: int, report_dir: str):
    join_as_torchrun(rank, world_size, port)
    torch.distributed.init_process_group("gloo")
    norm = torch.nn.BatchNorm2d(3)
    norm.running_mean.fill_(float(rank + 1))  # each process's last training step moved its own statistics
    norm.num_batches_tracked.fill_(10 + rank)
    broadcast_buffers(norm)
    Path(report_dir, f"rank{rank}.json").write_text(json.dumps(
        {"mean": norm.running_mean.tolist(), "batches": int(norm.num_batches_tracked)}))
    torch.distributed.destroy_process_group()


@pytest.mark.timeout(120)
def test_every_process_evaluates_with_rank_0s_batchnorm_statistics(tmp_path):
    mp.spawn(_buffers_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    reports = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(2)]
    assert reports == [{"mean": [1.0, 1.0, 1.0], "batches": 10}] * 2
