"""--compile: refused at start without the compiler torch.compile needs on the device; under DDP, Dynamo splits the
graph at DDP's buckets, and checkpoints keep plain parameter names."""
import dataclasses
import json
import logging
from pathlib import Path

import pytest
import torch.multiprocessing as mp
from ddp_env import free_port, join_as_torchrun
from torch._dynamo.utils import counters

from model import create_model
from model.checkpoints import read_checkpoint
from training.__main__ import main
from training.config import PRESETS
from training.run import compile_toolchain_problem, train


@pytest.fixture
def bare_path(tmp_path, monkeypatch) -> Path:
    """A PATH of one empty folder (no gcc, clang or g++ on it), with CC and CXX unset."""
    folder = tmp_path / "bin"
    folder.mkdir()
    monkeypatch.setenv("PATH", str(folder))
    monkeypatch.delenv("CC", raising=False)
    monkeypatch.delenv("CXX", raising=False)
    return folder


def _executable(path: Path) -> Path:
    """An executable under a compiler's name. The check looks compilers up as Triton and Inductor do and never runs
    one, so the tests do not depend on which compilers this host has."""
    path.write_text("#!/bin/sh\nexit 0\n")
    path.chmod(0o755)
    return path


def test_compile_on_a_gpu_without_a_c_compiler_is_refused_with_the_fix(bare_path):
    problem = compile_toolchain_problem("cuda")
    assert problem is not None and "\n" not in problem
    assert "C compiler" in problem and "install gcc" in problem and "drop --compile" in problem


@pytest.mark.parametrize("name", ["gcc", "clang"])
def test_a_gcc_or_clang_on_path_is_a_c_compiler_for_the_gpu(bare_path, name):
    _executable(bare_path / name)
    assert compile_toolchain_problem("cuda") is None


def test_cc_is_the_gpus_c_compiler_when_set_as_triton_takes_it(bare_path, tmp_path, monkeypatch):
    monkeypatch.setenv("CC", str(_executable(tmp_path / "cc")))  # found although PATH has none
    assert compile_toolchain_problem("cuda") is None
    _executable(bare_path / "gcc")
    monkeypatch.setenv("CC", "/opt/missing/cc")  # Triton takes $CC over gcc on PATH: it would fail with this one
    problem = compile_toolchain_problem("cuda")
    assert problem is not None and "CC='/opt/missing/cc'" in problem and "drop --compile" in problem


def test_compile_on_the_cpu_needs_a_cxx_compiler_not_a_c_one(bare_path):
    _executable(bare_path / "gcc")  # a C compiler satisfies the GPU check...
    assert compile_toolchain_problem("cuda") is None
    problem = compile_toolchain_problem("cpu")  # ...but Inductor's CPU kernels are C++
    assert problem is not None and "install g++" in problem and "drop --compile" in problem
    _executable(bare_path / "g++")
    assert compile_toolchain_problem("cpu") is None


def test_other_devices_are_not_checked(bare_path):
    assert compile_toolchain_problem("mps") is None


def test_the_cli_refuses_compile_before_loading_any_data(bare_path, tmp_path, capsys):
    """On this CPU host: the refusal is the first thing a run does (no output folder yet), one line, status 2."""
    output = tmp_path / "run"
    assert main(["--preset", "demo", "--compile", "--output", str(output)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("python -m training: error: --compile on the CPU needs a C++ compiler")
    assert err.count("\n") == 1 and not output.exists()


def _compiled_worker(rank: int, world_size: int, port: int, config, report_dir: str):
    join_as_torchrun(rank, world_size, port)
    splits: list[str] = []

    class DDPOptimizerLog(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if "DDPOptimizer used bucket cap" in record.getMessage():
                splits.append(record.getMessage().strip())

    logger = logging.getLogger("torch._dynamo.backends.distributed")  # DDPOptimizer logs its bucket split at INFO
    logger.setLevel(logging.INFO)
    logger.addHandler(DDPOptimizerLog())
    train(config)
    report = {"ddp_optimizer": splits, "graph_breaks": list(counters["graph_break"])}
    Path(report_dir, f"rank{rank}.json").write_text(json.dumps(report))


@pytest.mark.timeout(420)
def test_compiled_two_process_ddp_splits_at_ddps_buckets_and_saves_plain_checkpoints(tmp_path):
    """torch.compile inside DDP (PyTorch's advice): DDP is the active DDP module while the compiled module runs, so
    Dynamo's DDPOptimizer splits the graph at its buckets (all-reduce overlaps backward), with no graph break;
    torch.compile(DDP(model)) would break the graph twice in DDP's forward."""
    config = dataclasses.replace(
        PRESETS["demo"], epochs=2, warmup_epochs=0.0, batch_size=4, max_steps_per_epoch=1, ema_decay=0.9,
        base_lr=1e-3, lr_ref_batch=8, compile=True, quiet=True, output=str(tmp_path / "run"))
    reports = tmp_path / "reports"
    reports.mkdir()
    mp.spawn(_compiled_worker, args=(2, free_port(), config, str(reports)), nprocs=2, join=True)
    for rank in range(2):
        report = json.loads((reports / f"rank{rank}.json").read_text())
        assert report["ddp_optimizer"], f"rank {rank}: DDPOptimizer never split the compiled graph"
        assert report["graph_breaks"] == []
    saved = read_checkpoint(tmp_path / "run" / "checkpoint_last.pth")
    assert saved["epoch"] == 1  # trained again after the evaluation: the same compiled module, in and out of DDP
    plain = create_model(saved["model_name"], **saved["model_kwargs"]).state_dict().keys()
    assert saved["model"].keys() == plain and saved["model_ema"].keys() == plain  # no _orig_mod. / module.
    assert saved["metrics"]["count"] == saved["ema_metrics"]["count"] == 360
