"""scripts/gpu_check.sh, the one command for a GPU host: valid shell, lists its steps, fails fast without a GPU."""
from __future__ import annotations

import os
import shutil
import subprocess

from compose_yaml import ROOT

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
    assert '-m bench roadmap --engines gpu "${steps[@]}" --batch-sizes 1 32 --seconds 2' in step
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
