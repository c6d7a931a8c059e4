"""scripts/gpu_check.sh, the one command for a GPU host: valid shell, lists its steps, fails fast without a GPU, skips
bf16 (only) on a GPU without it."""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from compose_yaml import ROOT

from bench.roadmap_engines import BF16_MIN_COMPUTE_CAPABILITY, GROUPS, bf16_problem, gpu_engines_for

SCRIPT = ROOT / "scripts" / "gpu_check.sh"
STEPS = ["nvidia-smi", "venv", "doctor", "export", "tensorrt-fp32", "tensorrt-fp16", "tensorrt-bf16", "ort-cuda",
         "pytest-gpu", "bench", "roadmap"]


def test_the_script_parses_and_shellcheck_finds_nothing():
    assert subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True).returncode == 0
    shellcheck = shutil.which("shellcheck") or str(ROOT / ".venv" / "bin" / "shellcheck")
    result = subprocess.run([shellcheck, str(SCRIPT)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout


def test_dry_run_lists_every_step_and_touches_nothing(tmp_path):
    out = tmp_path / "report"
    result = subprocess.run(["bash", str(SCRIPT), "--dry-run", str(out)], capture_output=True, text=True, timeout=60,
                            env={**os.environ, "GPU_VENV": str(tmp_path / "venv")})
    assert result.returncode == 0, result.stderr
    listed = [line.split()[0] for line in result.stdout.splitlines()[1:]]
    assert listed == STEPS
    assert "session.get_providers()[0] checked" in result.stdout
    assert "python -m bench roadmap --engines gpu" in result.stdout and "(OUT_DIR/roadmap/)" in result.stdout
    assert not out.exists() and not (tmp_path / "venv").exists()


def test_the_roadmap_step_times_the_gpu_engines_briefly_into_the_check_output():
    step = SCRIPT.read_text().split("step_roadmap() {", 1)[1].split("\n}\n", 1)[0]
    assert '-m bench roadmap --engines $ROADMAP_ENGINES "${steps[@]}" --batch-sizes 1 32 --seconds 2' in step
    assert '--out "$OUT/roadmap"' in step and "steps=(--steps $ROADMAP_STEPS)" in step


def no_gpu_path(tmp_path) -> str:
    """A PATH with the tools the script uses and no nvidia-smi, whatever this machine has."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("bash", "date", "mkdir", "tee", "tail", "head", "uname", "git", "sed", "cat", "basename", "dirname"):
        found = shutil.which(tool)
        if found:
            (bin_dir / tool).symlink_to(found)
    return str(bin_dir)


def test_without_a_gpu_it_fails_fast_and_clearly_and_still_writes_a_report(tmp_path):
    out = tmp_path / "report"
    env = {"PATH": no_gpu_path(tmp_path), "HOME": str(tmp_path), "GPU_VENV": str(tmp_path / "venv")}
    result = subprocess.run([shutil.which("bash"), str(SCRIPT), str(out)], capture_output=True, text=True, timeout=60,
                            env=env)
    assert result.returncode == 2
    assert "no NVIDIA driver here (nvidia-smi not found)" in result.stderr and "driver >= 580" in result.stderr
    assert not (tmp_path / "venv").exists()  # failed before downloading gigabytes
    report = (out / "report.md").read_text()
    assert "| preflight | FAIL |" in report and "1 step(s) FAILED" in report
    assert (out / "logs" / "00-preflight.log").read_text().startswith("no NVIDIA driver here")


def test_with_a_gpu_but_no_usable_python_venv_it_fails_fast_naming_the_package(tmp_path):
    path = no_gpu_path(tmp_path)
    (tmp_path / "bin" / "nvidia-smi").write_text("#!/bin/sh\necho 'NVIDIA-SMI stand-in'\n")  # a GPU host's tool
    (tmp_path / "bin" / "nvidia-smi").chmod(0o755)
    out = tmp_path / "report"
    env = {"PATH": path, "HOME": str(tmp_path), "GPU_VENV": str(tmp_path / "venv"), "PYTHON": "python3-missing"}
    result = subprocess.run([shutil.which("bash"), str(SCRIPT), str(out)], capture_output=True, text=True, timeout=60,
                            env=env)
    assert result.returncode == 2
    assert "python3-missing cannot make the venv" in result.stderr and "apt-get install python3-venv" in result.stderr
    assert not (tmp_path / "venv").exists()


def fake_gpu_host(tmp_path, name: str, compute_capability: str) -> tuple[dict, Path]:
    """This machine's tools, an nvidia-smi that reports one GPU, and a venv whose python records its arguments: pytest
    prints the bf16 skip a pre-Ampere GPU gives, everything else fails at once (no downloads, no GPU work)."""
    bin_dir, venv_bin = tmp_path / "fake-bin", tmp_path / "venv" / "bin"
    bin_dir.mkdir()
    venv_bin.mkdir(parents=True)
    calls = tmp_path / "python-calls.txt"
    (bin_dir / "nvidia-smi").write_text(f"#!/bin/sh\necho '{name}, {compute_capability}'\n")
    (venv_bin / "python").write_text(
        f"#!/bin/sh\necho \"$*\" >> '{calls}'\n"
        'case "$*" in "-m pytest"*)\n'
        f"  echo 'SKIPPED [1] tests/gpu/test_tensorrt_export.py:44: {bf16_problem('7.5', 'Tesla T4')}'\n"
        "  echo '2 passed, 1 skipped'; exit 0 ;;\nesac\nexit 1\n")
    for tool in (bin_dir / "nvidia-smi", venv_bin / "python"):
        tool.chmod(0o755)
    env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "HOME": str(tmp_path), "GPU_VENV": str(tmp_path / "venv")}
    return env, calls


def test_on_a_turing_gpu_the_bf16_steps_are_skipped_with_the_reason_and_the_rest_still_runs(tmp_path):
    env, calls = fake_gpu_host(tmp_path, "Tesla T4", "7.5")
    out = tmp_path / "report"
    dry = subprocess.run(["bash", str(SCRIPT), "--dry-run", str(out)], capture_output=True, text=True, timeout=60,
                         env=env)
    assert "tensorrt-bf16  skipped: bf16 needs a GPU of compute capability >= 8.0" in dry.stdout
    assert "--engines tensorrt-fp16 onnxruntime-cuda-fp32: TensorRT fp16 + ORT CUDA fp32" in dry.stdout
    result = subprocess.run(["bash", str(SCRIPT), str(out)], capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode == 1  # the fake venv's python fails the other steps
    report = (out / "report.md").read_text()
    assert "| tensorrt-bf16 | SKIP (bf16 needs a GPU of compute capability >= 8.0 (Ampere or newer); Tesla T4 is " \
           "7.5) |" in report
    assert "| pytest-gpu | PASS |" in report  # the bf16 test's skip is the one this GPU is allowed
    assert "1 skipped: bf16 needs" in report and "step(s) FAILED" in report
    roadmap = [line for line in calls.read_text().splitlines() if line.startswith("-m bench roadmap")]
    assert roadmap == ["-m bench roadmap --engines tensorrt-fp16 onnxruntime-cuda-fp32 --batch-sizes 1 32 --seconds 2 "
                       f"--out {out}/roadmap"]
    assert not any("--precision bf16" in line for line in calls.read_text().splitlines())


def test_on_an_ampere_or_newer_gpu_every_step_runs_and_any_skipped_gpu_test_fails_the_check(tmp_path):
    env, calls = fake_gpu_host(tmp_path, "NVIDIA H200", "9.0")
    out = tmp_path / "report"
    subprocess.run(["bash", str(SCRIPT), str(out)], capture_output=True, text=True, timeout=120, env=env)
    report = (out / "report.md").read_text()
    assert "| tensorrt-bf16 | FAIL" in report and "| pytest-gpu | FAIL" in report and "| SKIP" not in report
    assert any(line.startswith("-m bench roadmap --engines gpu ") for line in calls.read_text().splitlines())
    assert any("--precision bf16" in line for line in calls.read_text().splitlines())


def test_the_scripts_bf16_rule_is_the_benchs():
    text = SCRIPT.read_text()
    assert f"BF16_MIN_MAJOR={BF16_MIN_COMPUTE_CAPABILITY[0]}\n" in text and BF16_MIN_COMPUTE_CAPABILITY[1] == 0
    assert f'PRE_AMPERE_GPU_ENGINES="{" ".join(gpu_engines_for("7.5"))}"' in text
    mark = text.split('BF16_SKIP_MARK="', 1)[1].split('"', 1)[0]
    assert mark in bf16_problem("7.5", "Tesla T4") and gpu_engines_for("8.0") == GROUPS["gpu"]
