"""The Dockerfile: hadolint-clean, pinned bases, and the three targets (GPU service, CPU service, train/export)."""
from __future__ import annotations

import importlib.util
import re
import shutil
import subprocess
import tomllib

import pytest
from compose_yaml import ROOT

DOCKERFILE = ROOT / "Dockerfile"
# deploy/requirements.py: what the images pip-install (a script, not a package, so it is loaded by path).
_spec = importlib.util.spec_from_file_location("deploy_requirements", ROOT / "deploy" / "requirements.py")
image_requirements = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(image_requirements)


def stages() -> dict[str, list[str]]:
    """Instructions per build stage (continuation lines joined), keyed by the stage name."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    result: dict[str, list[str]] = {}
    current = None
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        match = re.match(r"FROM\s+(\S+)(?:\s+AS\s+(\S+))?", line, re.I)
        if match:
            current = match.group(2) or match.group(1)
            result[current] = [line]
        elif current is not None:
            result[current].append(line)
    return result


def build_args() -> dict[str, str]:
    return dict(re.findall(r"^ARG (\w+)=(\S+)", DOCKERFILE.read_text(), re.M))


def test_hadolint_finds_nothing():
    hadolint = shutil.which("hadolint") or str(ROOT / ".venv" / "bin" / "hadolint")
    result = subprocess.run([hadolint, "--failure-threshold", "info", str(DOCKERFILE)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_is_live_and_flags_an_unpinned_base(tmp_path):
    hadolint = shutil.which("hadolint") or str(ROOT / ".venv" / "bin" / "hadolint")
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN pip install fastapi\n")
    result = subprocess.run([hadolint, str(bad)], capture_output=True, text=True)
    assert result.returncode != 0 and "DL3007" in result.stdout


def test_base_images_are_pinned_and_the_gpu_image_needs_no_nvidia_base():
    args = build_args()
    assert re.fullmatch(r"python:3\.11\.\d+-slim-\w+", args["PYTHON_IMAGE"])
    assert re.fullmatch(r"[0-9a-f]{64}", args["TINI_SHA256"])
    # CUDA, cuDNN and TensorRT come as pip wheels: no NGC base (its PIP_CONSTRAINT, entrypoint and missing venv).
    assert "nvcr.io" not in "".join(line for line in DOCKERFILE.read_text().splitlines()
                                    if line.startswith(("FROM", "ARG")))


@pytest.mark.parametrize("target,base", [("service", "${PYTHON_IMAGE}"), ("service-cpu", "${PYTHON_IMAGE}"),
                                         ("train", "${PYTHON_IMAGE}")])
def test_each_target_runs_non_root_under_tini(target, base):
    body = stages()[target]
    assert body[0].split()[1] == base
    users = [line.split()[1] for line in body if line.startswith("USER ")]
    assert users and users[-1] not in ("root", "0")
    assert any("tini" in line for line in body if line.startswith("ENTRYPOINT"))
    assert 'VOLUME ["/models"]' in body


@pytest.mark.parametrize("target", ["service", "service-cpu"])
def test_service_targets_check_healthz_and_expose_8000(target):
    body = stages()[target]
    assert any(line.startswith("HEALTHCHECK") and "healthcheck.py" in line for line in body)
    assert "/healthz" in (ROOT / "deploy" / "healthcheck.py").read_text()
    assert "EXPOSE 8000" in body


def test_gpu_image_installs_onnxruntime_gpu_and_no_torch_nor_cpu_onnxruntime():
    assert "deploy/requirements.py serve gpu >" in " ".join(stages()["gpu-deps"])
    names = [image_requirements.requirement_name(r) for r in image_requirements.requirements(["serve", "gpu"], [])]
    assert "onnxruntime-gpu" in names and "tensorrt-cu13" in names and "cuda-python" in names
    assert "onnxruntime" not in names
    assert not {"torch", "torchvision", "timm"} & set(names)


def test_cpu_image_installs_the_serve_extra_without_torch():
    assert "deploy/requirements.py serve cpu >" in " ".join(stages()["cpu-deps"])
    # From its lock, hashes required; then pyproject's pins, with no index, must already be met (a stale lock fails).
    install = " ".join(stages()["cpu-deps"])
    assert "COPY locks/service-cpu.txt locks/service-cpu.txt" in install
    assert "pip install --no-cache-dir --require-hashes -r locks/service-cpu.txt" in install
    assert "pip install --no-cache-dir --no-index -r /tmp/requirements.txt" in install
    names = [image_requirements.requirement_name(r) for r in image_requirements.requirements(["serve", "cpu"], [])]
    assert "onnxruntime" in names and "fastapi" in names
    assert not {"torch", "onnxruntime-gpu"} & set(names)


def test_train_image_has_torch_for_torchrun_and_export():
    assert "deploy/requirements.py train export cpu" in " ".join(stages()["train"])
    names = {image_requirements.requirement_name(r)
             for r in image_requirements.requirements(["train", "export", "cpu"], [])}
    assert {"torch", "torchvision", "onnx", "onnxruntime"} <= names


def test_unknown_extra_is_refused_with_the_known_ones():
    with pytest.raises(SystemExit, match="unknown extras"):
        image_requirements.requirements(["serv"], [])


def test_gpu_image_takes_cuda_cudnn_from_onnxruntime_gpus_extras_pinned_to_cuda_13_0():
    gpu = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["gpu"]
    assert "onnxruntime-gpu[cuda,cudnn]==1.31.1" in gpu
    install = " ".join(stages()["gpu-deps"])
    assert "-c deploy/gpu-constraints.txt" in install and "COPY deploy/requirements.py deploy/check_nvidia_index.py " \
        "deploy/gpu-constraints.txt deploy/" in install
    pins = dict(line.split("==") for line in (ROOT / "deploy" / "gpu-constraints.txt").read_text().splitlines()
                if line and not line.startswith("#"))
    # What onnxruntime-gpu 1.31.1's [cuda,cudnn] extras pull (its METADATA, checked with pip), each pinned exactly.
    assert set(pins) == {"nvidia-cuda-runtime", "nvidia-cublas", "nvidia-cuda-nvrtc", "nvidia-cufft", "nvidia-curand",
                         "nvidia-nvjitlink", "nvidia-cudnn-cu13"}
    assert pins["nvidia-cuda-runtime"].startswith("13.0.") and pins["nvidia-cudnn-cu13"].startswith("9.")
    # No hash lock here (the NVIDIA index cannot be reached where locks are made), and the Dockerfile says so.
    assert "--require-hashes" not in install and "not hash-locked" in DOCKERFILE.read_text().lower()


def test_gpu_image_checks_nvidias_index_before_installing_tensorrt_and_uses_it():
    install = stages()["gpu-deps"]
    run = next(line for line in install if line.startswith("RUN ") and "requirements.py serve gpu" in line)
    assert run.split("&&")[0].strip() == 'RUN python deploy/check_nvidia_index.py --index-url "${NVIDIA_PYPI_URL}"'
    assert '--extra-index-url "${NVIDIA_PYPI_URL}"' in run
    assert build_args()["NVIDIA_PYPI_URL"] == "https://pypi.nvidia.com"
    assert "pypi.nvidia.com" in "".join(line for line in DOCKERFILE.read_text().splitlines() if line.startswith("#"))


def _env(target: str) -> dict[str, str]:
    env_line = next(line for line in stages()[target] if line.startswith("ENV "))
    return dict(re.findall(r'(\w+)=("[^"]*"|\S+)', env_line[4:]))


def test_gpu_image_needs_only_the_driver_through_the_container_toolkit_and_states_its_minimum():
    env = _env("service")
    assert env["NVIDIA_VISIBLE_DEVICES"] == "all"
    assert env["NVIDIA_DRIVER_CAPABILITIES"] == "compute,utility"
    assert env["NVIDIA_REQUIRE_CUDA"] == '"cuda>=13.0"'  # the toolkit refuses drivers older than CUDA 13 (< 580)
    assert env["CONVNEXT_HOST_CHECK"] == "hold"
    assert any("driver >= 580" in line for line in stages()["service"] if line.startswith("LABEL"))


def test_gpu_image_puts_the_cuda_wheels_where_onnxruntime_looks_on_the_loader_path():
    python = re.match(r"python:(\d+\.\d+)", build_args()["PYTHON_IMAGE"]).group(1)
    site = f"/opt/venv/lib/python{python}/site-packages"
    # onnxruntime-gpu 1.31.1 (CUDA 13) expects nvidia/cu13/lib (cudart, cuBLAS, cuFFT, cuRAND) and nvidia/cudnn/lib.
    assert _env("service")["LD_LIBRARY_PATH"].split(":") == [f"{site}/nvidia/cu13/lib", f"{site}/nvidia/cudnn/lib"]


@pytest.mark.parametrize("target", ["service", "service-cpu", "train"])
def test_every_image_ships_the_host_check_the_entrypoint_imports(target):
    copies = " ".join(line for line in stages()[target] if line.startswith("COPY") and "entrypoint.py" in line)
    assert "deploy/host_check.py" in copies


@pytest.mark.parametrize("target", ["gpu-deps", "cpu-deps", "train"])
def test_every_stage_that_installs_the_project_copies_every_module_it_lists(target):
    """pyproject's py-modules (convnext_common, ...) and packages are in the image: setuptools only warns about a
    listed module that is missing and builds a wheel without it, and every entry point then fails to import."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    copied = {source.rstrip("/") for line in stages()[target] if line.startswith("COPY") and "--from" not in line
              for source in line.split()[1:-1] if not source.startswith("--")}
    assert {f"{module}.py" for module in project["py-modules"]} <= copied
    assert {package.split(".")[0] for package in project["packages"]} <= copied
