"""`python -m service doctor` on this CPU machine: it fails, names what is missing and how to fix it, never crashes."""
from __future__ import annotations

import fnmatch
import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import onnx
import pytest

from service.doctor import TINY_MODEL, CheckFailed, check_ort_provider, fallback_problem, requirements_for

ROOT = Path(__file__).resolve().parents[2]


def doctor(*args: str, pythonpath: list[Path] = ()) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([*map(str, pythonpath), str(ROOT)])}
    return subprocess.run([sys.executable, "-m", "service", "doctor", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120)


def lines_of(output: str) -> dict[str, str]:
    """'FAIL driver   no NVIDIA ...' -> {'driver': 'FAIL ...'} for the report's check lines."""
    result = {}
    for line in output.splitlines():
        for mark in ("ok  ", "FAIL", "--  "):
            if line.startswith(mark):
                name = line[5:35].strip()
                result[name] = line
    return result


def test_doctor_on_a_host_without_a_gpu_fails_and_names_what_is_missing():
    result = doctor()
    assert result.returncode == 1, result.stdout + result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    checks = lines_of(result.stdout)
    assert checks["driver"].startswith("FAIL") and "no NVIDIA driver is visible" in checks["driver"]
    assert checks["tensorrt"].startswith("FAIL") and "TensorRT is not installed" in checks["tensorrt"]
    assert checks["ort CUDAExecutionProvider"].startswith("FAIL")
    assert "CUDAExecutionProvider is not in this onnxruntime build" in checks["ort CUDAExecutionProvider"]
    assert checks["onnxruntime"].startswith("ok") and "onnxruntime (CPU build) 1.31.1" in checks["onnxruntime"]
    assert "fix: install NVIDIA driver >= 580" in result.stdout
    assert checks["cudnn"].startswith("FAIL") and "libcudnn.so.9 is not loadable" in checks["cudnn"]
    assert ("host check FAILED: driver, gpu, cuda libraries, cudnn, ort CUDAExecutionProvider, tensorrt, tensorrt "
            "engine") in result.stdout


def test_doctor_json_gives_each_required_failure_a_reason_and_a_fix():
    result = doctor("--json")
    assert result.returncode == 1
    report = json.loads(result.stdout)  # stdout is JSON only, even when ONNX Runtime warns
    assert report["ok"] is False and report["required"] == ["cuda", "gpu", "tensorrt"]
    failed = {c["name"]: c for c in report["checks"] if c["required"] and not c["ok"]}
    # CUDA serving needs cuDNN too: the provider opens it only when a node needs it, so its check is required.
    assert set(failed) == {"driver", "gpu", "cuda libraries", "cudnn", "ort CUDAExecutionProvider", "tensorrt",
                           "tensorrt engine"}
    for check in failed.values():
        assert check["fix"] or check["detail"].startswith("not run: "), check
    assert "pypi.nvidia.com" in failed["tensorrt"]["fix"]
    assert "onnxruntime-gpu[cuda,cudnn]==1.31.1" in failed["ort CUDAExecutionProvider"]["fix"]


def test_convnext_doctor_is_the_same_check():
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, "convnext_cli.py", "doctor", "--json"], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert json.loads(result.stdout)["ok"] is False


def test_doctor_for_cpu_serving_requires_nothing_and_passes_here():
    result = doctor("--engine", "onnxruntime", "--provider", "cpu")
    assert result.returncode == 0, result.stdout
    assert "required: nothing: CPU serving" in result.stdout and "host check passed" in result.stdout
    assert lines_of(result.stdout)["driver"].startswith("--")  # still reported, not required


def test_doctor_requires_what_each_serving_setting_needs():
    assert requirements_for("tensorrt", "cpu") == {"gpu", "tensorrt"}
    assert requirements_for("tensorrt", "cuda") == {"gpu", "tensorrt"}  # the native engine ignores the provider
    assert requirements_for("onnxruntime", "cuda") == {"gpu", "cuda"}
    assert requirements_for("onnxruntime", "tensorrt") == {"gpu", "ort-tensorrt"}
    assert requirements_for("onnxruntime", "cpu") == set()
    result = doctor("--engine", "onnxruntime", "--provider", "cuda", "--json")
    assert result.returncode == 1
    assert json.loads(result.stdout)["required"] == ["cuda", "gpu"]


def test_an_unknown_requirement_is_refused_with_the_known_ones():
    result = doctor("--require", "gpu,cudnn")
    assert result.returncode == 2
    assert "unknown requirement(s) ['cudnn']" in result.stderr and "ort-tensorrt" in result.stderr


def test_the_tiny_model_really_runs_on_a_provider_that_loads():
    assert check_ort_provider("CPUExecutionProvider") == "loads and runs (session providers: CPUExecutionProvider)"
    # A convolution: on the CUDA provider it runs cuDNN, which a model of one Add never loads.
    assert [node.op_type for node in onnx.load(TINY_MODEL).graph.node] == ["Reshape", "Conv", "Reshape"]


def test_a_provider_that_fails_inside_run_is_a_failure_not_a_quiet_cpu_rerun(monkeypatch):
    """ONNX Runtime's default (enable_fallback=1) catches a provider's EP_FAIL inside run(), prints "Falling back to
    ['CPUExecutionProvider'] and retrying." to stdout and answers from the CPU: the check said "loads and runs" (and
    the print broke --json). Fallback is off, and a failing run is the check's failure."""
    import onnxruntime as ort

    made = []

    class FailingRun(ort.InferenceSession):  # the real session; its run fails as a provider's EP_FAIL would
        def __init__(self, *args, **kwargs):
            made.append(kwargs)
            super().__init__(*args, **kwargs)

        def run(self, *args, **kwargs):
            raise RuntimeError("TensorRT EP execution context enqueue failed.")

    monkeypatch.setattr(ort, "InferenceSession", FailingRun)
    with pytest.raises(CheckFailed, match="CPUExecutionProvider loads but failed to run the tiny model: TensorRT EP "
                                          "execution context enqueue failed"):
        check_ort_provider("CPUExecutionProvider")
    assert made == [{"providers": ["CPUExecutionProvider"], "enable_fallback": 0}]


def test_a_provider_that_fell_back_to_cpu_is_a_failure():
    # What onnxruntime-gpu 1.31.1 returned here for providers=["CUDAExecutionProvider"] with no libcuda.so.1.
    assert fallback_problem("CUDAExecutionProvider", ["CPUExecutionProvider"]) == (
        "CUDAExecutionProvider is in this build but did not load: ONNX Runtime fell back to CPUExecutionProvider")
    assert fallback_problem("CUDAExecutionProvider", ["CUDAExecutionProvider", "CPUExecutionProvider"]) is None


def test_the_tiny_model_ships_in_the_service_package():
    package_data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    relative = TINY_MODEL.relative_to(ROOT / "service").as_posix()
    assert TINY_MODEL.is_file() and TINY_MODEL.stat().st_size < 1024
    assert any(fnmatch.fnmatch(relative, pattern) for pattern in package_data["service"])


@pytest.fixture()
def onnxruntime_gpu_metadata(tmp_path) -> Path:
    """What `pip install --target DIR onnxruntime-gpu` leaves for importlib.metadata: its dist-info folder."""
    dist_info = tmp_path / "onnxruntime_gpu-1.31.1.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text("Metadata-Version: 2.1\nName: onnxruntime-gpu\nVersion: 1.31.1\n")
    return tmp_path


def test_both_onnxruntime_packages_installed_is_a_failure_with_the_fix(onnxruntime_gpu_metadata):
    result = doctor("--require", "cuda", "--json", pythonpath=[onnxruntime_gpu_metadata])
    assert result.returncode == 1
    packages = next(c for c in json.loads(result.stdout)["checks"] if c["name"] == "packages")
    assert packages["required"] and not packages["ok"]
    assert "both onnxruntime 1.31.1 and onnxruntime-gpu 1.31.1 are installed" in packages["detail"]
    assert packages["fix"].startswith("pip uninstall -y onnxruntime onnxruntime-gpu && pip install")
