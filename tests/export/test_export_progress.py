"""`python -m export onnx` says each stage in a line as it starts (build, ONNX, parity, each precision); --quiet not."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def export_cli(tmp_path: Path, *extra: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "export", "onnx", "--model", "convnext_atto", "--num-classes", "10",
               "--input-size", "32", "--name", "p", "--repository", str(tmp_path), *extra]
    env = os.environ | {"PYTHONPATH": str(ROOT)}
    return subprocess.run(command, capture_output=True, text=True, timeout=300, env=env, check=True)


def test_each_export_stage_is_one_line(tmp_path):
    stderr = export_cli(tmp_path, "--precisions", "fp32,fp16").stderr
    stages = [line.split(": ", 1)[1] for line in stderr.splitlines() if line.startswith("INFO export.onnx: [")]
    assert [s.split("]")[0] + "]" for s in stages] == ["[1/4]", "[2/4]", "[3/4]", "[4/4]"]
    assert stages[0].startswith("[1/4] build convnext_atto (random init, seed 0) (")
    assert "INFO export.source: random init: 12 layer-scale gammas drawn near 1, not 1e-6" in stderr
    assert stages[1].startswith("[2/4] ONNX: export convnext_atto at 32 px, opset 18")
    assert stages[2].startswith("[3/4] parity: ONNX Runtime fp32 vs PyTorch")
    assert stages[3].startswith("[4/4] fp16: convert and verify")
    # The fp16 converter warns once per clamped tensor: one summary line instead.
    assert "UserWarning" not in stderr
    assert [line for line in stderr.splitlines() if "INFO export." not in line] == []


def test_quiet_export_prints_no_progress(tmp_path):
    result = export_cli(tmp_path, "--quiet")
    assert "INFO" not in result.stderr and result.stdout.startswith(f"wrote {tmp_path}")
