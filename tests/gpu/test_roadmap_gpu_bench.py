"""GPU: `python -m bench roadmap` times one step on TensorRT fp16 / bf16 (Ampere or newer) and ONNX Runtime CUDA
fp32."""
from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys

import pytest

pytestmark = pytest.mark.gpu


def test_one_roadmap_step_on_every_gpu_engine(tmp_path):
    if importlib.util.find_spec("tensorrt") is None or shutil.which("nvidia-smi") is None:
        pytest.skip("needs an NVIDIA GPU with TensorRT installed (bash scripts/gpu_check.sh sets up such a venv)")
    from bench.roadmap_engines import gpu_engines_for
    from runtime.tensorrt import tensorrt_target

    engines = list(gpu_engines_for(tensorrt_target().compute_capability))  # a Turing GPU has no bf16 to time
    done = subprocess.run(
        [sys.executable, "-m", "bench", "roadmap", "--engines", *engines, "--steps", "gelu", "--batch-sizes", "1", "4",
         "--seconds", "0.2", "--input-size", "32", "--out", str(tmp_path)], capture_output=True, text=True,
        timeout=540,  # under pytest-timeout's 600 s (pyproject), so a slow run fails with its own output
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["engines"] == engines
    assert results["device"] == "GPU" and "GPU " in results["host"] and results["versions"]["tensorrt"]
    (step,) = results["steps"]
    for engine in results["engines"]:
        assert set(step["results"][engine]) == {"1", "4"}
        assert all(p["images_per_s"] > 0 and p["calls"] >= 1 for p in step["results"][engine].values())
    assert "every step on every GPU engine" in (tmp_path / "report.md").read_text()
